"""Image augmentations of the NEPA release (nepa-recipe.md §8, §10), driven by config values.

* pretraining: torchvision RandomResizedCrop(224, scale (0.08, 1), bilinear) + flip 0.5 +
  Normalize(0.5, 0.5) — nothing else;
* fine-tuning: timm ``create_transform`` (RandomResizedCrop bicubic, flip, RandAugment
  ``rand-m9-mstd0.5-inc1``, RandomErasing 0.25 "pixel") and timm ``Mixup`` as a collate
  (mixup 0.8, cutmix 1.0, prob 1, switch 0.5, "batch", label smoothing 0.1);
* evaluation: bicubic resize to ``floor(size / crop_pct)`` then CenterCrop(size); B keeps
  the aspect ratio (shorter side 256, crop_pct 0.875), L squashes to a 235x235 square
  (crop_pct 0.95, ``eval_resize_mode: square``), exactly as the release's eval scripts.

timm is used wherever it defines the operation (RandAugment, RandomErasing, Mixup), so the
recipe is the library's code rather than a hand approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass
class ImageAugConfig:
    """Every knob of the image pipelines; the defaults are the release's pretraining ones."""

    img_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # training crop + flip (torchvision unless RandAugment / erasing / jitter ask for timm)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolation: str = "bilinear"  # pretraining bilinear; fine-tune and probe bicubic
    hflip: float = 0.5
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (timm syntax)
    color_jitter: float | None = None  # timm turns it off anyway when RandAugment is on
    reprob: float = 0.0  # RandomErasing probability (timm)
    remode: str = "pixel"
    recount: int = 1
    # Mixup / CutMix collate (timm). Label smoothing is the task's (data.label_smoothing):
    # applied inside Mixup when Mixup is on, in the cross-entropy otherwise
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    # evaluation: resize to floor(img_size / crop_pct) ("shorter" side or "square"), crop
    eval_crop_pct: float = 0.875
    eval_resize_mode: str = "shorter"
    eval_interpolation: str = "bicubic"

    def __post_init__(self):
        for key in ("interpolation", "eval_interpolation"):
            if getattr(self, key) not in _INTERP:
                raise ValueError(f"aug.{key}={getattr(self, key)!r}; use one of {list(_INTERP)}")
        if self.eval_resize_mode not in ("shorter", "square"):
            raise ValueError(f"aug.eval_resize_mode={self.eval_resize_mode!r}; use shorter|square")
        if not 0 < self.eval_crop_pct <= 1:
            raise ValueError(f"aug.eval_crop_pct={self.eval_crop_pct} must be in (0, 1]")

    @property
    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def train_transform(cfg: ImageAugConfig):
    """PIL RGB image -> normalised (3, S, S) tensor, with the training augmentations."""
    if cfg.auto_augment or cfg.reprob > 0 or cfg.color_jitter:
        return _timm_train_transform(cfg)
    return T.Compose(
        [
            T.RandomResizedCrop(
                cfg.img_size,
                scale=tuple(cfg.scale),
                ratio=tuple(cfg.ratio),
                interpolation=_INTERP[cfg.interpolation],
            ),
            T.RandomHorizontalFlip(cfg.hflip),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def _posterize_keeping_zero_bits(img, bits_to_keep, **kw):
    """timm's posterize, also for 0 bits. RandAugment ``inc1`` asks for 4 - int(level * 0.4)
    bits, so 0 at magnitude 10 (reached with mstd 0.5); Pillow >= 11 raises for 0 bits where
    older Pillow returned an all-black image (every bit masked off). Keep the old result
    instead of crashing a fine-tuning data worker."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kw)  # timm's function is left in place


def _patch_timm_posterize() -> None:
    """Route timm's three posterize ops (looked up by name when an op is built) to the shim."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize_keeping_zero_bits


def _timm_train_transform(cfg: ImageAugConfig):
    from timm.data import create_transform  # optional dependency: the "vision" extra

    _patch_timm_posterize()  # before the ops are built: they look their function up then
    return create_transform(
        input_size=cfg.img_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )


def eval_resize_size(cfg: ImageAugConfig) -> int:
    """The pre-crop size: 256 for 224 / 0.875, 235 for 224 / 0.95 (floor, as timm and HF)."""
    return math.floor(cfg.img_size / cfg.eval_crop_pct)


def eval_transform(cfg: ImageAugConfig):
    """Resize (bicubic; shorter side or square) + CenterCrop + Normalize."""
    s = eval_resize_size(cfg)
    size = s if cfg.eval_resize_mode == "shorter" else (s, s)
    return T.Compose(
        [
            T.Resize(size, interpolation=_INTERP[cfg.eval_interpolation]),
            T.CenterCrop(cfg.img_size),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


class MixupCollate:
    """default_collate, then timm Mixup/CutMix on the batch -> (images, soft targets (B, C)).

    timm mixes a batch with its flipped self and needs an even size; an odd last batch
    loses its final sample (training uses drop_last, so only tiny data sets see this).
    """

    def __init__(self, cfg: ImageAugConfig, num_classes: int, label_smoothing: float = 0.0):
        from timm.data import Mixup

        self.mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, samples):
        x, y = torch.utils.data.default_collate(samples)
        if x.shape[0] % 2:
            x, y = x[:-1], y[:-1]
        return self.mixup(x, y)
