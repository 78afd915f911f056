"""Image readers, bad-sample accounting, pack-images and shard streaming (local, pipe:, http)."""

import functools
import http.server
import io
import json
import os
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from unipred.tasks.image.data import (
    ImageFolderDataset,
    ShardDataset,
    image_dataset,
    read_label_file,
    resolve_shards,
)
from unipred.tasks.image.decode import decode_image
from unipred.tasks.image.pack import add_arguments, pack

from unipred.data import cli as data_cli
from unipred.data.accounting import BadSampleCounter

RNG = np.random.default_rng(0)


def _rgb(h=24, w=20, value=None):
    a = (
        RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)
        if value is None
        else np.full((h, w, 3), value, np.uint8)
    )
    return Image.fromarray(a)


def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_tree(root, n_good=4):
    """Two classes with good images plus one of every kind of bad file."""
    for c in ("a_cls", "b_cls"):
        os.makedirs(root / c)
        for i in range(n_good):
            _rgb().save(root / c / f"{c}_{i}.JPEG", quality=90)
    data = _jpeg_bytes(_rgb())
    (root / "a_cls" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _rgb().convert("CMYK").save(root / "a_cls" / "cmyk.jpg")
    _rgb().convert("L").save(root / "a_cls" / "gray.png")
    ramp = (np.arange(24 * 20).reshape(24, 20) * 130).astype(np.uint16)  # up to 62270
    Image.fromarray(ramp).save(root / "b_cls" / "deep16.png")
    _rgb(1, 1).save(root / "b_cls" / "tiny.png")
    (root / "b_cls" / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "b_cls" / "notes.txt").write_text("ignored: no image extension")
    _rgb().save(root / "b_cls" / "png_named_jpeg.JPEG", format="PNG")


EXPECTED = {
    "skipped/corrupt": 1,
    "skipped/truncated": 1,
    "skipped/tiny": 1,
    # the grey file is converted to RGB without being counted (lossless)
    "converted/cmyk": 1,
    "converted/high_bit_depth": 1,
}


def _nonzero(snap):
    return {k: v for k, v in snap.items() if v and not k.endswith("/total")}


def test_image_folder_converts_or_skips_and_counts_each_bad_file_once(tmp_path):
    make_tree(tmp_path)
    counter = BadSampleCounter()
    ds = ImageFolderDataset(str(tmp_path), lambda im: im, counter=counter)
    assert ds.classes == ["a_cls", "b_cls"] and len(ds) == 15
    out = [ds[i] for i in range(len(ds))]
    assert all(im.mode == "RGB" and min(im.size) >= 8 for im, _ in out)
    assert _nonzero(counter.snapshot()) == EXPECTED
    assert counter.snapshot()["skipped/total"] == 3
    counter.reset()
    assert counter.snapshot()["skipped/total"] == 0


def test_sixteen_bit_is_scaled_not_clipped_and_truncated_is_never_padded():
    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    c = BadSampleCounter()
    img = np.asarray(decode_image(buf.getvalue(), counter=c))
    assert img.shape == (8, 8, 3)
    # PIL's own convert("RGB") would clip everything above 255 to white
    np.testing.assert_array_equal(img[..., 0], (ramp.astype(np.int64) * 255 // 65535))
    data = _jpeg_bytes(_rgb(64, 64))
    assert decode_image(data[:-200], counter=c) is None
    assert c.snapshot()["skipped/truncated"] == 1


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent "red"
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    c = BadSampleCounter()
    img = decode_image(buf.getvalue(), counter=c)
    assert img.getpixel((3, 3)) == (255, 255, 255)
    assert c.snapshot()["converted/palette_or_alpha"] == 1


def test_counts_from_dataloader_workers_reach_the_main_process(tmp_path):
    make_tree(tmp_path)
    counter = BadSampleCounter()
    ds = ImageFolderDataset(str(tmp_path), lambda im: torch.zeros(1), counter=counter)
    n = sum(len(y) for _, y in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2))
    assert n == 15
    assert _nonzero(counter.snapshot()) == EXPECTED


def test_flat_folder_with_label_files(tmp_path):
    flat = tmp_path / "val"
    flat.mkdir()
    for i in range(4):
        _rgb().save(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "labels.txt").write_text(
        "".join(f"ILSVRC2012_val_{i:08d}.JPEG n0{i % 2}\n" for i in range(4))
    )
    kaggle = "ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},n0{i % 2} 1 2 3 4 n09 5 6 7 8\n" for i in range(4)
    )
    (tmp_path / "LOC_val_solution.csv").write_text(kaggle)
    (tmp_path / "classes.txt").write_text("n01\nn00\n")  # a train split's order wins
    for lf in ("labels.txt", "LOC_val_solution.csv"):
        ds = ImageFolderDataset(str(flat), label_file=str(tmp_path / lf))
        assert [y for _, y in ds.samples] == [0, 1, 0, 1]
        ds = ImageFolderDataset(
            str(flat), label_file=str(tmp_path / lf), classes_file=str(tmp_path / "classes.txt")
        )
        assert [y for _, y in ds.samples] == [1, 0, 1, 0]
    (tmp_path / "gt.txt").write_text("65\n970\n")
    with pytest.raises(ValueError, match="one-column"):
        read_label_file(str(tmp_path / "gt.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"))


def _pack(src, out, *extra):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return pack(p.parse_args([str(src), str(out), "--workers", "1", *extra]))


def test_pack_keeps_original_bytes_shuffles_and_drops_bad(tmp_path):
    make_tree(tmp_path / "src")
    meta = _pack(tmp_path / "src", tmp_path / "train", "--max-per-shard", "5")
    assert meta["num_samples"] == 12 and meta["num_shards"] == 3
    assert meta["bad_samples"] == {
        "corrupt": 1,
        "truncated": 1,
        "tiny": 1,
        "cmyk": 1,
        "high_bit_depth": 1,
    }
    assert json.loads((tmp_path / "train/meta.json").read_text())["classes"] == ["a_cls", "b_cls"]
    labels, seen = [], {}
    for shard in sorted((tmp_path / "train").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                seen[m.name] = tf.extractfile(m).read()
    for name, data in seen.items():
        if name.endswith(".json"):
            rel = json.loads(data)["path"]
            key = name[: -len(".json")]
            img_key = next(
                k for k in seen if k.startswith(key + ".") and k.split(".")[-1] in ("jpg", "png")
            )
            assert seen[img_key] == (tmp_path / "src" / rel).read_bytes()  # bytes unchanged
            if rel.endswith("png_named_jpeg.JPEG"):
                assert img_key.endswith(".png")  # stored under its real format
            labels.append(int(seen[key + ".cls"]))
    assert sorted(labels) == [0] * 6 + [1] * 6
    assert labels != sorted(labels)  # shuffled across classes
    rc = data_cli.main(["pack-images", str(tmp_path / "src"), str(tmp_path / "train")])
    assert rc == 2  # refuses to overwrite without --overwrite


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    src = tmp / "src"
    for c in range(3):
        os.makedirs(src / f"c{c}")
        for i in range(8):
            _rgb(value=c * 10 + i).save(src / f"c{c}" / f"{i}.jpg", quality=95)
    _pack(src, tmp / "train", "--max-per-shard", "3")
    return tmp / "train"


def _ids(ds):
    # every image is a flat colour: its value identifies the sample
    return [int(round(float(np.asarray(im).mean()))) for im, _ in ds]


def _stream(spec, **kw):
    return ShardDataset(str(spec), transform=lambda im: im, **kw)


def test_shards_eval_reads_everything_once(shards):
    ds = image_dataset(str(shards), lambda im: im, training=False)
    assert isinstance(ds, ShardDataset) and len(ds.urls) == 8 and len(ds) == 24
    out = list(ds)
    assert len(out) == 24
    assert sorted(y for _, y in out) == [0] * 8 + [1] * 8 + [2] * 8


def test_shards_reshuffle_per_epoch_deterministically(shards):
    ds = _stream(shards, shuffle_buffer=8, seed=3)
    e0, e1 = _ids(ds), _ids(ds)  # epochs advance by themselves
    assert len(e0) == len(e1) == 24 and sorted(e0) == sorted(e1) and e0 != e1
    ds.set_epoch(0)
    assert _ids(ds) == e0
    ds.set_epoch(1)
    assert _ids(ds) == e1


def test_shards_split_by_node_and_worker(shards, monkeypatch):
    everything = _ids(_stream(shards, training=False))
    assert sorted(everything) == [c * 10 + i for c in range(3) for i in range(8)]
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = _stream(shards, seed=1)
        ds.set_epoch(0)
        assert len(ds) == 12
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        per_rank.append(_ids(dl))
    assert [len(r) for r in per_rank] == [12, 12]  # exactly num_samples / world per rank
    assert not set(per_rank[0]) & set(per_rank[1])  # 8 shards: disjoint halves
    monkeypatch.setenv("WORLD_SIZE", "2")
    ids = []
    for rank in (0, 1):  # evaluation: every sample exactly once over ranks and workers
        monkeypatch.setenv("RANK", str(rank))
        ds = _stream(shards, training=False)
        ids += _ids(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(ids) == sorted(everything)


def test_more_readers_than_shards_split_samples(tmp_path, shards):
    one = tmp_path / "one.tar"
    one.write_bytes((shards / "train-000000.tar").read_bytes())
    ds = _stream(one, training=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(_ids(dl)) == sorted(_ids(_stream(one, training=False)))


def test_resume_skips_what_was_consumed(shards):
    ds = _stream(shards, seed=5, shuffle_buffer=4)
    ds.set_epoch(2)
    ds.resume(0, 2)
    full = _ids(ds)
    ds.set_epoch(2)
    ds.resume(5, 2)  # five batches of two
    assert _ids(ds) == full[10:]
    ds.set_epoch(3)  # the skip belonged to epoch 2 only
    assert len(_ids(ds)) == len(full)


def test_pipe_and_http_urls_and_read_errors_are_counted(shards):
    pattern = str(shards / "train-{000000..000007}.tar")
    assert len(resolve_shards(pattern)) == 8
    ds = _stream(f"pipe:cat {pattern}", training=False)
    assert len(list(ds)) == 24
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/train-{{000000..000001}}.tar"
        assert len(list(_stream(url, training=False))) == 6
        c = BadSampleCounter()
        bad = f"pipe:cat {shards}/train-000000.tar::pipe:cat {shards}/missing.tar"
        assert len(list(_stream(bad, training=False, counter=c))) == 3
        assert c.snapshot()["skipped/shard_gone"] >= 1
    finally:
        server.shutdown()


def test_data_cli_registry(capsys):
    assert data_cli.main([]) == 2
    assert data_cli.main(["--help"]) == 0
    assert "pack-images" in capsys.readouterr().out
    assert data_cli.main(["no-such-thing"]) == 2
    import importlib

    assert {"pack-images", "pack-audio", "pack-video", "pack-segmentation"} <= set(
        data_cli.subcommands()
    )
    for name, mod in data_cli.subcommands().items():
        m = importlib.import_module(mod)
        assert callable(m.add_arguments) and callable(m.run), name


def test_pack_flat_val_with_label_file_and_train_classes(tmp_path):
    flat = tmp_path / "val"
    flat.mkdir()
    for i in range(4):
        _rgb().save(flat / f"v{i}.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"v{i},n0{i % 2} 1 2 3 4\n" for i in range(4))
    )
    (tmp_path / "classes.txt").write_text("n01\nn00\n")
    rc = data_cli.main(
        [
            "pack-images", str(flat), str(tmp_path / "out"), "--workers", "1",
            "--label-file", str(tmp_path / "LOC_val_solution.csv"),
            "--classes", str(tmp_path / "classes.txt"),
        ]
    )  # fmt: skip
    assert rc == 0
    ds = ShardDataset(str(tmp_path / "out"), training=False)
    assert ds.classes == ["n01", "n00"] and ds.num_samples == 4
    got = {}
    for shard in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(shard) as tf:
            names = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for n, v in names.items():
            if n.endswith(".json"):
                got[json.loads(v)["path"]] = int(names[n[: -len("json")] + "cls"])
    assert got == {"v0.JPEG": 1, "v1.JPEG": 0, "v2.JPEG": 1, "v3.JPEG": 0}
