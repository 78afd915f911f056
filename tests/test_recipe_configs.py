"""configs/image/*.yaml carry the release's numbers (nepa-recipe.md sections 1, 8, 10).

The tables below are copied from the recipe, not from the configs; every config value that
the recipe fixes is compared with them, including what the model sizes resolve to.
"""

from pathlib import Path

import pytest
from unipred.tasks.image.tasks import ImageClassify
from unipred.tasks.image.transforms import eval_resize_size

from unipred.train.config import build_model_config, load_config
from unipred.train.engine import batch_plan
from unipred.train.optim import warmup_steps

ROOT = Path(__file__).resolve().parents[1] / "configs/image"

# section 8: identical for B and L except the per-device batch
PRETRAIN = {
    "optim.lr": 4.8e-3,  # 3e-4 * 4096 / 256
    "optim.betas": [0.9, 0.95],
    "optim.eps": 1e-8,
    "optim.weight_decay": 0.05,
    "optim.grad_clip": 1.0,
    "optim.schedule": "cosine",
    "optim.warmup_ratio": 0.025,
    "trainer.global_batch": 4096,
    "trainer.max_epochs": 1600,
    "trainer.precision": "bf16-mixed",
    "trainer.drop_last": True,
    "ema.enabled": True,
    "ema.decay": 0.9999,
    "seed": 1337,
    "data.aug.img_size": 224,
    "data.aug.scale": [0.08, 1.0],
    "data.aug.ratio": [3 / 4, 4 / 3],
    "data.aug.interpolation": "bilinear",
    "data.aug.hflip": 0.5,
    "data.aug.mean": [0.5, 0.5, 0.5],
    "data.aug.std": [0.5, 0.5, 0.5],
    "data.aug.auto_augment": None,
    "data.aug.reprob": 0.0,
    "data.aug.mixup": 0.0,
    "data.aug.cutmix": 0.0,
}
# section 10
FINETUNE = {
    "trainer.max_epochs": 100,
    "trainer.global_batch": 1024,
    "trainer.precision": "bf16-mixed",
    "trainer.drop_last": True,
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "optim.weight_decay": 0.05,
    "optim.grad_clip": 1.0,
    "optim.schedule": "llrd_cosine_warmup",
    "optim.head_lr": 1e-3,
    "optim.freeze": ["tokenizer.proj.*"],
    "ema.enabled": True,
    "ema.decay": 0.9999,
    "ema.monitor_ema": True,
    "seed": 1337,
    "data.mode": "finetune",
    "data.num_classes": 0,  # from the data (ImageNet: 1000 class folders) or the checkpoint
    "data.label_smoothing": 0.1,
    "data.aug.img_size": 224,
    "data.aug.scale": [0.08, 1.0],
    "data.aug.interpolation": "bicubic",
    "data.aug.hflip": 0.5,
    "data.aug.auto_augment": "rand-m9-mstd0.5-inc1",
    "data.aug.reprob": 0.25,
    "data.aug.remode": "pixel",
    "data.aug.recount": 1,
    "data.aug.mixup": 0.8,
    "data.aug.cutmix": 1.0,
    "data.aug.mixup_prob": 1.0,
    "data.aug.mixup_switch_prob": 0.5,
    "data.aug.mixup_mode": "batch",
    "data.aug.mean": [0.5, 0.5, 0.5],
    "data.aug.std": [0.5, 0.5, 0.5],
    "data.aug.eval_interpolation": "bicubic",
}
SIZE = {
    "b": {
        "optim.lr": 6e-3,
        "optim.llrd": 0.65,
        "optim.warmup_ratio": 0.2,
        "drop_path": 0.1,
        "resize": 256,
        "data.aug.eval_resize_mode": "shorter",
        "dim": 768,
        "depth": 12,
        "heads": 12,
    },
    "l": {
        "optim.lr": 4e-3,
        "optim.llrd": 0.75,
        "optim.warmup_ratio": 0.3,
        "drop_path": 0.2,
        "resize": 235,
        "data.aug.eval_resize_mode": "square",
        "dim": 1024,
        "depth": 24,
        "heads": 16,
    },
}
# MAE's linear-probe protocol (the release has none); LARS -> AdamW is a stated deviation
LINPROBE = {
    "data.mode": "probe",
    "trainer.global_batch": 16384,
    "trainer.max_epochs": 90,
    "optim.warmup_ratio": 10 / 90,
    "optim.weight_decay": 0.0,
    "optim.name": "lars",  # MAE: LARS, blr 0.1, momentum 0.9
    "optim.blr": 0.1,
    "optim.lr": 0.1 * 16384 / 256,  # derived from blr at load time
    "optim.momentum": 0.9,
    "data.label_smoothing": 0.0,
    "data.aug.mixup": 0.0,
    "data.aug.cutmix": 0.0,
    "data.aug.auto_augment": None,
    "data.aug.reprob": 0.0,
    "data.aug.interpolation": "bicubic",
    "data.aug.scale": [0.08, 1.0],
    "data.aug.eval_crop_pct": 0.875,
    "data.aug.eval_resize_mode": "shorter",
    "ema.enabled": False,
}


def _load(name):
    return load_config(ROOT / f"{name}.yaml", check_paths=False)


def _get(cfg, key):
    if key == "optim.lr":
        return batch_plan(cfg)["lr"]
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check(cfg, table):
    for key, want in table.items():
        got = _get(cfg, key)
        if isinstance(want, float) or (
            isinstance(want, list) and want and isinstance(want[0], float)
        ):
            assert got == pytest.approx(want, rel=1e-9), key
        else:
            assert got == want, key


@pytest.mark.parametrize("size", ["b", "l"])
def test_pretrain_configs(size):
    cfg = _load(f"nepa_vit_{size}14_pretrain")
    assert cfg.task == "image_pretrain"
    _check(cfg, PRETRAIN)
    _check(cfg, {"optim.lr": 4.8e-3})
    mc = build_model_config(cfg.model)
    p, s = mc.predictor, SIZE[size]
    assert (p.dim, p.depth, p.heads, p.causal, p.drop_path) == (
        s["dim"],
        s["depth"],
        s["heads"],
        True,
        0.0,
    )
    assert p.qk_norm_affine == (size == "l")  # section 1: B pretrains without the QK-norm weight
    assert mc.tokenizer_args["patch_size"] == 14 and mc.head is None
    assert batch_plan(cfg)["per_device_batch"] == {"b": 256, "l": 128}[size]
    # 40 of the 1600 epochs warm up
    assert warmup_steps(1600 * 312, cfg.optim.warmup_ratio) == 40 * 312


@pytest.mark.parametrize("size", ["b", "l"])
def test_finetune_configs(size):
    cfg = _load(f"vit_{size}14_finetune")
    s = SIZE[size]
    assert cfg.task == "image_classify"
    _check(cfg, FINETUNE)
    _check(cfg, {k: v for k, v in s.items() if "." in k})
    assert eval_resize_size(cfg.data.aug) == s["resize"]
    mc = build_model_config(cfg.model, head="mean", num_classes=1000)
    p = mc.predictor
    assert (p.causal, p.qk_norm_affine, p.drop_path) == (False, True, s["drop_path"])
    assert mc.head == "mean" and mc.num_classes == 1000
    assert p.rope_rescale == 2.0  # the coordinate augmentation stays on when fine-tuning


@pytest.mark.parametrize("size", ["b", "l"])
def test_eval_configs(size):
    cfg = _load(f"vit_{size}14_eval")
    s = SIZE[size]
    assert cfg.task == "image_classify" and cfg.data.mode == "eval"
    _check(
        cfg,
        {
            "data.aug.eval_interpolation": "bicubic",
            "data.aug.img_size": 224,
            "data.aug.mean": [0.5] * 3,
            "data.aug.std": [0.5] * 3,
            "data.aug.eval_resize_mode": s["data.aug.eval_resize_mode"],
        },
    )
    assert eval_resize_size(cfg.data.aug) == s["resize"]
    # the eval config builds the same classifier as the fine-tune config
    ft = _load(f"vit_{size}14_finetune")
    assert build_model_config(cfg.model, head="mean") == build_model_config(ft.model, head="mean")


def test_linprobe_config():
    cfg = _load("vit_b14_linprobe")
    _check(cfg, LINPROBE)
    assert cfg.model.name == "nepa_vit_b14"  # the pretrained (causal) architecture
    cfg.data.num_classes = 1000  # what ImageNet's class folders give (no data here)
    task = ImageClassify(cfg)
    model = task.build_model()
    assert type(model.head).__name__ == "LinearProbeHead" and model.head.bn.affine is False
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.classifier.weight", "head.classifier.bias"]


def test_every_image_config_is_covered():
    # small_*: aliases of configs/small/* (not the release's recipes), nothing but the _base_
    for p in ROOT.glob("small_*.yaml"):
        body = [ln for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert body == [f"_base_: ../small/{p.stem.removeprefix('small_')}.yaml"], p
    names = sorted(p.stem for p in ROOT.glob("*.yaml")
                   if not p.stem.startswith(("ade20k", "small_")))  # fmt: skip
    assert names == [
        "nepa_vit_b14_pretrain",
        "nepa_vit_l14_pretrain",
        "vit_b14_eval",
        "vit_b14_finetune",
        "vit_b14_linprobe",
        "vit_l14_eval",
        "vit_l14_finetune",
    ]
