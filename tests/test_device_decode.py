"""data.decode_on_device: the worker passes JPEG bytes and the crop/flip draws, the batch is
decoded, cropped and resized where it is moved. On the CPU this must give the PIL pipeline's
images (same crops, same flips, resize within rounding), and bad files must be counted."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from unipred.tasks.image.device_decode import DeviceDecodeTransform, EncodedImage
from unipred.tasks.image.transforms import ImageAugConfig, train_transform

from unipred.data.accounting import BadSampleCounter


def _photo(h=90, w=120, seed=0) -> Image.Image:
    """Smooth, asymmetric content: a wrong crop or flip shows up as a large difference."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, (xx * yy) / (h * w) * 255], -1)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _bytes(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_device_path_matches_the_pil_pipeline(interp):
    aug = ImageAugConfig(img_size=32, interpolation=interp)
    cpu_tf, dev_tf = train_transform(aug), DeviceDecodeTransform.from_aug(aug)
    data = _bytes(_photo(), quality=95)
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        want = cpu_tf(Image.open(io.BytesIO(data)).convert("RGB"))
        torch.manual_seed(seed)
        enc = dev_tf.from_bytes(data, "photo.jpg")
        assert enc is not None and enc.data is not None  # travels encoded
        flips.add(enc.flip)
        got = dev_tf.collate([(enc, 3)])[0].to("cpu")[0]
        assert got.shape == want.shape == (3, 32, 32)
        err = (got - want).abs()
        # PIL rounds its resize to uint8 (<= 1/255 = 0.008 in these units); kernels differ a bit
        assert err.mean() < 0.01 and err.max() < 0.1, (seed, float(err.mean()), float(err.max()))
    assert flips == {True, False}  # both branches were compared


def test_non_jpeg_and_bad_files_are_converted_or_skipped_and_counted():
    aug = ImageAugConfig(img_size=16)
    tf, counter = DeviceDecodeTransform.from_aug(aug), BadSampleCounter()
    photo = _photo(40, 50)
    png = tf.from_bytes(_bytes(photo, "PNG"), "a.png", counter=counter)
    assert png is not None and png.data is None and png.pixels.shape == (3, 40, 50)
    cmyk = tf.from_bytes(_bytes(photo.convert("CMYK")), "b.jpg", counter=counter)
    assert cmyk is not None and cmyk.pixels is not None
    gray = tf.from_bytes(_bytes(photo.convert("L")), "c.jpg", counter=counter)
    assert gray is not None and gray.data is not None  # decoded to RGB on the device
    good = _bytes(photo)
    assert tf.from_bytes(good[: len(good) // 2], "d.jpg", counter=counter) is None
    assert tf.from_bytes(b"not an image", "e.jpg", counter=counter) is None
    assert tf.from_bytes(_bytes(_photo(5, 50)), "f.jpg", counter=counter) is None
    snap = counter.snapshot()
    assert snap["converted/cmyk"] == 1 and snap["converted/color_to_gray"] == 0
    assert snap["skipped/truncated"] == 1 and snap["skipped/corrupt"] == 1
    assert snap["skipped/tiny"] == 1 and snap["skipped/total"] == 3
    x = tf.collate([(png, 0), (cmyk, 1), (gray, 2)])[0].to("cpu")
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()


def test_a_jpeg_that_fails_on_the_device_is_counted_and_replaced():
    tf, counter = DeviceDecodeTransform.from_aug(ImageAugConfig(img_size=16)), BadSampleCounter()
    good = tf.from_bytes(_bytes(_photo(40, 50)), "good.jpg", counter=counter)
    junk = bytes([0xFF, 0xD8]) + bytes(range(256)) * 4 + bytes([0xFF, 0xD9])
    bad = EncodedImage((0, 0, 10, 10), False, data=torch.frombuffer(bytearray(junk), dtype=torch.uint8),
                       what="bad.jpg")  # fmt: skip
    batch, labels = tf.collate([(good, 0), (bad, 1)])
    batch.counter = counter
    x = batch.to("cpu")
    assert x.shape == (2, 3, 16, 16) and torch.equal(x[1], x[0])  # same size batch, counted
    assert counter.snapshot()["skipped/total"] == 1 and labels.tolist() == [0, 1]


def test_jpegs_the_device_decoder_rejects_fall_back_to_pil(monkeypatch):
    import torchvision.io

    tf, counter = DeviceDecodeTransform.from_aug(ImageAugConfig(img_size=16)), BadSampleCounter()
    torch.manual_seed(0)
    items = [(tf.from_bytes(_bytes(_photo(40, 50, seed=i)), f"{i}.jpg", counter=counter), i)
             for i in range(3)]  # fmt: skip
    want = tf.collate(items)[0].to("cpu")

    def reject(*a, **k):
        raise RuntimeError("unsupported JPEG flavour")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", reject)
    batch = tf.collate(items)[0]
    batch.counter = counter
    got = batch.to("cpu")
    assert (got - want).abs().max() < 0.05 and counter.snapshot()["skipped/total"] == 0


def test_pipeline_options_it_cannot_run_are_refused():
    with pytest.raises(ValueError, match="auto_augment"):
        DeviceDecodeTransform.from_aug(ImageAugConfig(auto_augment="rand-m9-mstd0.5-inc1"))
    from unipred.train.config import load_config

    # refused when the config is loaded, before any task or process exists
    with pytest.raises(ValueError, match="image_pretrain only"):
        load_config(None, ["task=image_classify", "data.decode_on_device=true"])


def test_pretraining_through_the_engine_decodes_on_the_device(tmp_path):
    """An ImageFolder of JPEGs (one PNG among them), image_pretrain with decode_on_device:
    the engine moves the encoded batch, which decodes itself; training runs and learns."""
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    for i in range(24):
        d = tmp_path / "data" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        fmt = "PNG" if i == 5 else "JPEG"
        _photo(48, 64, seed=i).save(d / f"{i}.{fmt.lower()}", format=fmt)
    over = ["task=image_pretrain", "model.name=nepa_debug", f"data.root={tmp_path / 'data'}",
            "data.decode_on_device=true", "data.aug.img_size=32", "data.num_workers=0",
            "trainer.global_batch=8", "trainer.max_steps=6", "trainer.accelerator=cpu",
            "trainer.progress_bar=false", "trainer.loggers=[]", "ema.enabled=false",
            f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    trainer = fit(load_config(None, over))
    assert trainer.global_step == 6
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_shard_reader_hands_over_encoded_jpegs(tmp_path):
    import argparse

    from unipred.tasks.image.data import ShardDataset
    from unipred.tasks.image.pack import add_arguments, pack

    for i in range(6):
        d = tmp_path / "src" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        _photo(48, 64, seed=i).save(d / f"{i}.jpg", quality=90)
    p = argparse.ArgumentParser()
    add_arguments(p)
    pack(p.parse_args([str(tmp_path / "src"), str(tmp_path / "shards"), "--workers", "1"]))
    tf = DeviceDecodeTransform.from_aug(ImageAugConfig(img_size=16))
    got = list(ShardDataset(str(tmp_path / "shards"), tf, training=True, shuffle_buffer=1))
    assert len(got) == 6 and all(isinstance(e, EncodedImage) and e.data is not None for e, _ in got)
    assert sorted(y for _, y in got) == [0, 0, 1, 1, 2, 2]
    assert tf.collate(got)[0].to("cpu").shape == (6, 3, 16, 16)
