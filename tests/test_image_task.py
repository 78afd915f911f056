"""image_pretrain / image_classify end to end on tiny real image files (CPU, a few steps)."""

import json
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from unipred.tasks.image.data import ShardDataset

from unipred.base.registry import TASKS
from unipred.data.accounting import COUNTER
from unipred.train.config import load_config
from unipred.train.engine import LitTask, evaluate, fit

FIX = Path(__file__).parent / "fixtures" / "nepa_ref"

BASE = [
    "model.name=nepa_debug",
    "trainer.progress_bar=false",
    "trainer.loggers=[csv]",
    "trainer.global_batch=4",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "data.aug.img_size=32",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
]


def _tree(root, n=6):
    """Two classes of coloured noise, plus a truncated, a CMYK, a gray and a 1x1 image."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        os.makedirs(root / f"c{c}")
        for i in range(n):
            a = np.clip(rng.normal(colour, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.jpg")
    data = (root / "c0" / "0.jpg").read_bytes()
    (root / "c0" / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.open(root / "c1" / "0.jpg").convert("CMYK").save(root / "c1" / "cmyk.jpg")
    Image.new("RGB", (1, 1)).save(root / "c1" / "dot.png")
    Image.open(root / "c0" / "1.jpg").convert("L").save(root / "c0" / "gray.png")
    return root  # 16 files: 14 usable


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imgdata")
    tree = _tree(tmp / "tree")
    from unipred.data.cli import main

    for split in ("train", "val"):
        assert main(["pack-images", str(tree), str(tmp / split), "--workers", "1"]) == 0
    return tmp


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("pre")
    cfg = load_config(
        None,
        [
            "task=image_pretrain",
            f"run_dir={run}",
            f"data.root={data / 'tree'}",
            "data.max_bad_fraction=0.5",  # 2 of 16 files are unreadable on purpose
            *BASE,
        ],
    )
    COUNTER.reset()
    trainer = fit(cfg)  # the engine logs bad-sample counts every epoch by itself
    return run, trainer


def test_pretrain_on_an_image_folder_logs_bad_samples_per_epoch(pretrained):
    run, trainer = pretrained
    assert trainer.global_step == 4  # 16 files (bad ones replaced by good ones) / 4
    m = trainer.callback_metrics
    assert float(m["data/skipped/truncated"]) == 1 and float(m["data/skipped/tiny"]) == 1
    assert float(m["data/converted/cmyk"]) == 1
    # a grey image is not a problem: never counted, so its column is not even logged
    assert float(m.get("data/converted/color_to_gray", 0)) == 0
    assert "data/converted/resampled" not in m  # another modality's reasons stay out of the logs
    assert np.isfinite(float(m["train/loss"]))
    assert COUNTER.snapshot()["skipped/total"] == 0  # reset after logging
    report = json.loads((run / "data_report.json").read_text())  # counts + names per epoch
    assert report["epochs"][0]["counts"]["skipped/truncated"] == 1
    assert any(b["file"].endswith("cut.jpg") for b in report["epochs"][0]["bad_files"])


def _classify(data, run, *over):
    return load_config(
        None,
        [
            "task=image_classify",
            f"run_dir={run}",
            f"data.root={data / 'train'}",
            f"data.val_root={data / 'val'}",
            "data.num_classes=2",
            *BASE,
            *over,
        ],
    )


@pytest.fixture(scope="module")
def finetuned(data, pretrained, tmp_path_factory):
    run = tmp_path_factory.mktemp("ft")
    cfg = _classify(
        data,
        run,
        f"model.init=pretrain:{pretrained[0]}/checkpoints/last.ckpt:ema",
        "data.aug.auto_augment=rand-m9-mstd0.5-inc1",
        "data.aug.reprob=0.25",
        "data.aug.mixup=0.8",
        "data.aug.cutmix=1.0",
        "data.aug.interpolation=bicubic",
        "data.label_smoothing=0.1",
        "optim.freeze=[tokenizer.proj.*]",
        "optim.schedule=llrd_cosine_warmup",
        "optim.llrd=0.65",
    )
    lit = LitTask(cfg)
    zeroed = float(lit.model.head.classifier.weight.abs().max()) == 0
    return run, fit(cfg), zeroed


def test_finetune_from_pretraining_with_the_release_augmentations(finetuned):
    run, trainer, zeroed = finetuned
    assert zeroed  # pretrain -> classifier conversion zeroes the classifier, as the release
    m = trainer.callback_metrics
    assert trainer.global_step == 3 and 0 <= float(m["val/acc1"]) <= 1  # 14 packed -> 3 x 4
    assert "val_ema/acc1" in m and "val/acc5" in m


def _raw(data, n=4):
    import webdataset as wds

    shard = sorted((data / "train").glob("*.tar"))[0]
    return list(wds.tarfile_samples([{"url": str(shard)}]))[:n]


def test_mixup_collate_gives_soft_targets(data, tmp_path):
    cfg = _classify(data, tmp_path, "data.aug.mixup=0.8", "data.aug.cutmix=1.0")
    task = TASKS.get("image_classify")(cfg)
    ds = task.build_dataset("train")
    x, y = task.collate_fn("train")([ds.decode(s) for s in _raw(data)])
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 2) and y.is_floating_point()
    assert task.collate_fn("val") is None
    assert TASKS.get("image_classify")(_classify(data, tmp_path)).collate_fn("train") is None


def test_linear_probe_trains_only_the_head_on_eval_mode_features(data, tmp_path):
    cfg = _classify(
        data,
        tmp_path,
        "data.mode=probe",
        "optim.lr=0.01",
        "optim.freeze=[cls_token,tokenizer.*,predictor.*]",
        "ema.enabled=false",
    )
    L.seed_everything(cfg.seed, verbose=False)  # the same init as fit() builds
    lit = LitTask(cfg)
    model, task = lit.model, lit.task
    assert type(model.head).__name__ == "LinearProbeHead" and not model.head.bn.affine
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    x = torch.randn(4, 3, 32, 32)
    # RoPE rescale and drop path are training-mode features: the probe must not see them
    torch.testing.assert_close(task.probe_logits(model, x), task.probe_logits(model, x))
    trainer = fit(cfg)
    after = trainer.lightning_module.model.state_dict()
    for k, v in before.items():
        same = torch.equal(v, after[k])
        if k.startswith("head.classifier"):
            assert not same, k
        elif not k.startswith("head.bn"):
            assert same, k  # the backbone is frozen


def test_eval_mode_validates_a_checkpoint(data, finetuned, tmp_path):
    ckpt = finetuned[0] / "checkpoints/last.ckpt"
    ev = _classify(data, tmp_path / "ev", "data.mode=eval", f"ckpt={ckpt}", "data.root=''")
    task = TASKS.get("image_classify")(ev)
    assert task.build_dataset("train") is None
    assert isinstance(task.build_dataset("val"), ShardDataset)  # the real val set, not synthetic
    units = {}
    res = evaluate(ev, units)
    assert 0 <= res["val/acc1"] <= 1 and "val/acc5" in res and "val_ema/acc1" in res
    # `unipred eval` prints these in percent, as the progress lines above them (losses as is)
    assert units["val/acc1"] == units["val_ema/acc5"] == "%" and "val/loss" not in units


def test_bad_mode_and_unknown_epoch_length_fail_clearly(data, tmp_path):
    with pytest.raises(ValueError, match="data.mode"):
        TASKS.get("image_classify")(_classify(data, tmp_path, "data.mode=zeroshot"))
    remote = f"pipe:cat {sorted((data / 'train').glob('*.tar'))[0]}"
    cfg = _classify(data, tmp_path, f"data.root={remote}")
    with pytest.raises(ValueError, match="data.num_samples"):
        TASKS.get("image_classify")(cfg).build_dataset("train")


def test_released_finetuned_checkpoint_evaluates_with_its_own_head(tmp_path):
    from unipred.nn.model import NEPA
    from unipred.train.checkpoint import apply_init
    from unipred.weights.hub import load_official_nepa

    meta = json.loads((FIX / "meta.json").read_text())
    d = tmp_path / "cls"
    d.mkdir()
    hf = dict(meta["cls_model"]["config_full"], architectures=["ViTNepaForImageClassification"])
    (d / "config.json").write_text(json.dumps(hf))
    shutil.copy(FIX / "cls_model.safetensors", d / "model.safetensors")
    ref = load_official_nepa(d).eval()
    model = NEPA(ref.cfg).eval()
    apply_init(model, f"official:{d}")
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(model(x).logits, ref(x).logits)
