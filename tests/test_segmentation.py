"""Segmentation: model shapes, pyramid, padding, sliding window, metrics, ADE20K data, task."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from unipred.tasks.image.seg_data import (
    ADE20KFolder,
    SegShardDataset,
    SyntheticScenes,
    checked_pairs,
)
from unipred.tasks.image.seg_transforms import (
    SegAugConfig,
    SegEvalTransform,
    SegTrainTransform,
    _hsv_to_rgb,
    _rgb_to_hsv,
    random_crop,
    reduce_zero_label,
    rescale_size,
)
from unipred.tasks.image.segmentation import (
    Pyramid,
    SegHeadConfig,
    SegmentationModel,
    slide_logits,
    window_starts,
)

from unipred.nn.model import NEPA
from unipred.task.seg_metrics import (
    MeanAccuracy,
    MeanIoU,
    PixelAccuracy,
    segmentation_metrics,
)
from unipred.train.checkpoint import load_backbone


def tiny_model(num_classes=5, **kw):
    torch.manual_seed(0)
    head = SegHeadConfig(layers=[0, 1, 2, 3], channels=16, aux_channels=8)
    return SegmentationModel.from_name("nepa_debug", head, num_classes, depth=4, **kw)


# ------------------------------------------------------------------------------- model
def test_output_shapes_any_size_and_backbone_keys():
    m = tiny_model()
    out = m(torch.randn(2, 3, 30, 42))  # not multiples of the patch size 4
    assert out.logits.shape == (2, 5, 30, 42) and out.aux_logits.shape == (2, 5, 30, 42)
    m.eval()
    assert m(torch.randn(1, 3, 30, 42)).aux_logits is None  # aux head only in training
    nepa_keys = set(NEPA.from_name("nepa_debug", depth=4).state_dict())
    backbone = {k for k in m.state_dict() if not k.startswith("head.")}
    assert backbone == nepa_keys


def test_pyramid_scales():
    feats = [torch.randn(2, 64, 8, 6) for _ in range(4)]
    outs = Pyramid(64)(feats)
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    m = tiny_model()
    f = m.features(torch.randn(1, 3, 32, 24))
    assert [tuple(x.shape) for x in f] == [(1, 64, 8, 6)] * 4


def test_features_are_the_requested_blocks_without_prefix():
    m = tiny_model().eval()
    x = torch.randn(1, 3, 16, 16)
    out = m.forward_features(x, layers=(0, 1, 2, 3), causal=False)
    f = m.features(x)
    for got, h in zip(f, out.layers):
        assert torch.equal(got, h[:, 1:].transpose(1, 2).reshape(1, 64, 4, 4))


def test_padding_equals_explicit_pad_then_crop():
    m = tiny_model().eval()
    x = torch.randn(1, 3, 30, 42)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 2))  # to 32 x 44
    a = m(x).logits
    assert torch.allclose(a, m(padded).logits[:, :, :30, :42], atol=1e-5)


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    m = tiny_model().eval()
    x = torch.randn(2, 3, 30, 42)
    whole = m.predict(x, mode="whole")
    slide = m.predict(x, mode="slide", crop=64, stride=40)
    assert torch.allclose(whole, slide, atol=1e-6)
    assert torch.allclose(whole.sum(1), torch.ones(2, 30, 42), atol=1e-5)


def test_sliding_window_grid_and_coverage():
    assert window_starts(683, 512, 341) == [0, 171]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(1400, 512, 341) == [0, 341, 682, 888]
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, w):
            calls.append(tuple(w.shape))
            return type("O", (), {"logits": torch.ones(w.shape[0], 2, *w.shape[2:])})()

    out = slide_logits(Probe(), torch.zeros(1, 3, 40, 70), crop=32, stride=20)
    assert torch.allclose(out, torch.ones_like(out))  # overlaps averaged back to 1
    assert sum(c[0] for c in calls) == 2 * 3  # rows {0, 8} x cols {0, 20, 38}


def test_multiscale_flip_shapes():
    m = tiny_model().eval()
    p = m.predict(torch.randn(1, 3, 16, 24), (32, 48), "slide", 16, 12, (0.5, 1.0), True)
    assert p.shape == (1, 5, 32, 48) and torch.allclose(p.sum(1), torch.ones(1, 32, 48))


def test_bad_layers_and_loss_ignores_255():
    with pytest.raises(ValueError, match="layers"):
        SegmentationModel.from_name("nepa_debug", SegHeadConfig(layers=[0, 1, 2, 7]), depth=4)
    m = tiny_model()
    out = m(torch.randn(2, 3, 16, 16))  # BatchNorm after the 1x1 pooling needs batch > 1
    y = torch.full((2, 16, 16), 255)
    y[0, :4, :4] = 1
    loss, logs = m.loss(out, y)
    ref = torch.nn.functional.cross_entropy(
        out.logits[0, :, :4, :4].reshape(5, -1).T, y[0, :4, :4].flatten()
    )
    assert torch.allclose(logs["loss_decode"], ref, atol=1e-5)


def test_nepa_checkpoint_loads_into_the_backbone():
    src = NEPA.from_name("nepa_debug", depth=4, qk_norm_affine=False)  # pretraining layout
    m = tiny_model(qk_norm_affine=True)
    load_backbone(m, src.state_dict(), "pretrain")
    got = m.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k
    assert torch.equal(got["predictor.blocks.0.attn.q_norm.weight"], torch.ones(16))


# ----------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computed_values():
    # 3 classes; 255 ignored. gt / pred pairs (excluding ignore):
    # (0,0) x2, (0,1) x1, (1,1) x2, (1,2) x1, (2,2) x1  -> confusion rows = gt
    gt = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 255, 255]])
    pr = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0, 2]])
    m = segmentation_metrics(3)
    m.update(pr, gt)
    r = {k: float(v) for k, v in m.compute().items()}
    # IoU0 = 2/(3+2-2)=2/3, IoU1 = 2/(3+3-2)=1/2, IoU2 = 1/(1+2-1)=1/2
    assert r["val/mIoU"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert r["val/mAcc"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert r["val/aAcc"] == pytest.approx(5 / 7)


def test_metrics_absent_class_is_left_out_and_states_sum():
    gt, pr = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, 1]])
    miou = MeanIoU(4)  # classes 2, 3 never appear: NaN, excluded from the mean
    miou.update(pr, gt)
    assert float(miou.compute()) == pytest.approx((1 / 2 + 2 / 3) / 2)
    a, b, whole = PixelAccuracy(4), PixelAccuracy(4), PixelAccuracy(4)
    a.update(pr[:, :2], gt[:, :2])
    b.update(pr[:, 2:], gt[:, 2:])
    whole.update(pr, gt)
    a.merge_state(b)  # what DDP's sync does with dist_reduce_fx="sum"
    assert torch.equal(a.confmat, whole.confmat) and float(a.compute()) == 0.75
    scores = torch.zeros(1, 4, 4).scatter_(1, pr[:, None], 1.0)  # (B, C, N) class scores
    m2 = MeanAccuracy(4)
    m2.update(scores, gt)
    assert float(m2.compute()) == pytest.approx((1 / 2 + 1) / 2)


# -------------------------------------------------------------------------------- data
def make_ade(root, split="training", n=3, bad_size=None, no_ann=None, no_img=None):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"ADE_{split}_{i:08d}"
        h, w = 40 + i, 56
        if name != no_img:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{name}.jpg"
            )
        lh = h + 3 if name == bad_size else h
        lab = np.tile(np.arange(w, dtype=np.uint8) % 4, (lh, 1))  # ids 0..3, 0 = "other"
        if name != no_ann:
            Image.fromarray(lab, mode="L").save(root / "annotations" / split / f"{name}.png")
    return root


def test_mismatched_label_size_is_reported_by_name(tmp_path):
    make_ade(tmp_path, bad_size="ADE_training_00000001")
    with pytest.raises(ValueError, match=r"ADE_training_00000001\.png: label size 56x44"):
        checked_pairs(tmp_path, "training")
    assert len(checked_pairs(tmp_path, "training", skip_bad=True)) == 2


def test_missing_pair_is_reported_by_name(tmp_path):
    make_ade(tmp_path, no_ann="ADE_training_00000002", no_img="ADE_training_00000000")
    with pytest.raises(ValueError) as e:
        checked_pairs(tmp_path, "training")
    assert "ADE_training_00000002.jpg: no annotation" in str(e.value)
    assert "ADE_training_00000000.png: no image" in str(e.value)


def test_folder_reader_reduces_labels(tmp_path):
    make_ade(tmp_path)
    ds = ADE20KFolder(tmp_path, "training", SegEvalTransform(SegAugConfig(), resize=False))
    img, lab = ds[0]
    assert img.shape == (3, 40, 56) and lab.shape == (40, 56)
    assert lab[0, :4].tolist() == [255, 0, 1, 2] and -1.0 <= img.min() and img.max() <= 1.0


def test_pack_segmentation_cli_and_shard_reader(tmp_path):
    from unipred.data.cli import main

    src = make_ade(tmp_path / "ade", n=3)
    make_ade(src, "validation", n=2, bad_size="ADE_validation_00000001")
    out = tmp_path / "shards"
    assert main(["pack-segmentation", str(src), str(out), "--shard-size", "2"]) == 1  # bad pair
    assert main(["pack-segmentation", str(src), str(out), "--shard-size", "2", "--skip-bad"]) == 0
    assert sorted(p.name for p in (out / "training").glob("*.tar")) == [
        "training-000000.tar", "training-000001.tar"]  # fmt: skip
    assert json.loads((out / "validation" / "meta.json").read_text())["num_samples"] == 1
    ds = SegShardDataset(str(out / "validation"), SegEvalTransform(SegAugConfig(), False), False)
    ((img, lab),) = list(ds)
    assert img.shape == (3, 40, 56) and lab[0, :4].tolist() == [255, 0, 1, 2]


def test_train_transform_crop_pad_and_ranges():
    cfg = SegAugConfig(img_scale=[128, 32], crop_size=48)
    tf = SegTrainTransform(cfg, rng=random.Random(0))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    lab = torch.randint(0, 5, (60, 90))
    for _ in range(5):
        x, y = tf(img, lab)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        assert x.min() >= -1.0 and x.max() <= 1.0
    small = SegTrainTransform(
        SegAugConfig(img_scale=[40, 10], ratio_range=[1.0, 1.0], crop_size=48)
    )
    x, y = small(img, lab)  # resized to 10 x 15, padded to 48
    assert (y[10:] == 255).all() and (y[:, 15:] == 255).all() and (x[:, 10:] == 0).all()
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(300, 2000, (2048, 512)) == (307, 2048)


def test_cat_max_ratio_rejects_single_class_crops():
    lab = torch.zeros(40, 40, dtype=torch.long)
    lab[:, 30:] = 1  # only crops reaching x >= 30 hold two classes
    img = torch.zeros(3, 40, 40)
    for seed in range(5):
        _, y = random_crop(img, lab, 20, 0.75, 255, random.Random(seed))
        counts = torch.bincount(y.flatten())
        assert len(counts) == 2 and counts.max() / counts.sum() < 0.75


def test_hsv_round_trip_and_reduce_zero_label():
    img = torch.rand(3, 8, 8) * 255
    assert torch.allclose(_hsv_to_rgb(*_rgb_to_hsv(img)), img, atol=1e-3)
    assert reduce_zero_label(np.array([0, 1, 150], dtype=np.uint8)).tolist() == [255, 0, 149]


def test_synthetic_scenes_have_all_classes():
    ds = SyntheticScenes(16, 32, seed=0)
    labels = torch.stack([ds[i][1] for i in range(16)])
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(ds[3][0], SyntheticScenes(16, 32, seed=0)[3][0])


# -------------------------------------------------------------------------------- task
def test_poly_schedule_values():
    from unipred.train.optim import poly_multiplier

    assert poly_multiplier(0, 1500, 160000) == pytest.approx(1e-6)
    assert poly_multiplier(750, 1500, 160000) == pytest.approx((1 - 750 / 160000) * (0.5 + 0.5e-6))
    assert poly_multiplier(80000, 1500, 160000) == pytest.approx(0.5)
    assert poly_multiplier(160000, 1500, 160000) == 0.0


def test_task_smoke_fit_and_validate(tmp_path):
    from unipred.tasks.image.segment import SegmentADE20K

    from unipred.train.config import load_config
    from unipred.train.engine import fit

    over = [f"{k}={v}" for k, v in SegmentADE20K.smoke_config().items()]
    over += ["task=segment_ade20k", f"run_dir={tmp_path}", "trainer.accelerator=cpu",
             "trainer.max_steps=2", "trainer.fast_dev_run=2", "trainer.progress_bar=false",
             "optim.schedule=poly", "ema.enabled=false"]  # fmt: skip
    trainer = fit(load_config(None, over))
    assert trainer.global_step == 2
    assert 0.0 <= float(trainer.callback_metrics["val/mIoU"]) <= 1.0


def test_task_reads_the_folder_layout(tmp_path):
    from unipred.base.registry import TASKS
    from unipred.train.config import load_config

    make_ade(tmp_path, "training", n=2)
    make_ade(tmp_path, "validation", n=1)
    over = ["task=segment_ade20k", f"data.root={tmp_path}", f"data.val_root={tmp_path}",
            "data.aug.crop_size=32", "data.aug.img_scale=[128,32]", "data.eval.crop=32"]  # fmt: skip
    task = TASKS.get("segment_ade20k")(load_config(None, over))
    x, y = task.build_dataset("train")[1]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert set(y.unique().tolist()) <= {0, 1, 2, 255}
    imgs, labels = task.collate_fn("val")([task.build_dataset("val")[0]])
    assert imgs[0].shape == (3, 32, 45) and labels[0].shape == (40, 56)  # label keeps its size


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from unipred.task.seg_metrics import MeanIoU

def work(rank, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    gt, pr = torch.randint(0, 5, (2, 64), generator=g), torch.randint(0, 5, (2, 64), generator=g)
    m = MeanIoU(5)
    m.update(pr[rank : rank + 1], gt[rank : rank + 1])  # each rank sees half the data
    got = float(m.compute())
    ref = MeanIoU(5)
    ref.update(pr, gt)
    q.put((rank, got, float(ref.compute())))
    dist.destroy_process_group()

if __name__ == "__main__":
    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(work, args=(q,), nprocs=2)
    for _ in range(2):
        print(*q.get())
"""


@pytest.mark.slow  # two spawned processes: ~40 s on a busy 2-core machine
def test_metric_is_summed_across_ddp_ranks(tmp_path):
    import socket
    import subprocess
    import sys

    script = tmp_path / "ddp_metric.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, str(script), str(port)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.strip().splitlines()]
    assert len(rows) == 2
    for _, got, ref in rows:
        assert float(got) == pytest.approx(float(ref))
