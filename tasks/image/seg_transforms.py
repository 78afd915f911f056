"""Joint image + label transforms of the standard ADE20K protocol (mmseg's pipeline, in torch).

Training: random resize (ratio of a keep-ratio scale), random crop with a category max ratio,
horizontal flip, photometric distortion, normalise, pad to the crop size (labels padded with
the ignore index). Evaluation: keep-ratio resize of the image only (labels stay at their
original size; predictions are resized back to them), normalise.

Images enter as PIL RGB or (3, H, W) uint8 tensors, labels as PIL "L"/"P" images or (H, W)
integer tensors that are already reduced (see ``reduce_zero_label``). Randomness comes from
the ``random.Random`` given (default: the module's), so DataLoader worker seeding applies.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SegAugConfig:
    """Every number of the train / eval pipelines (defaults: mmseg's ADE20K 512x512)."""

    img_scale: list[int] = field(default_factory=lambda: [2048, 512])  # (long, short) max
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: int = 512
    cat_max_ratio: float = 0.75  # re-draw crops where one class covers more than this
    flip_prob: float = 0.5
    photometric: bool = True
    brightness_delta: float = 32.0
    contrast_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    saturation_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    hue_delta: int = 18  # in OpenCV hue units (180 = full circle)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # NEPA: pixels -> [-1, 1]
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


def reduce_zero_label(label: np.ndarray | torch.Tensor, ignore_index: int = 255):
    """ADE20K ids 1..150 -> 0..149; 0 ("other") -> ignore_index."""
    lab = torch.as_tensor(np.asarray(label)).long()
    return torch.where(lab == 0, torch.full_like(lab, ignore_index), lab - 1)


def rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: fit the long side in scale[0] and the short in scale[1]."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def to_tensor_image(img) -> torch.Tensor:
    """PIL / HWC array / CHW tensor -> (3, H, W) float in 0..255."""
    if isinstance(img, torch.Tensor):
        return img.float()
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float()


def resize_pair(img: torch.Tensor, label: torch.Tensor | None, size):
    """Bilinear image (rounded like a uint8 resize) and nearest label, to size (h, w)."""
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    img = img.round().clamp_(0, 255)
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return img, label


def random_crop(img, label, crop: int, cat_max_ratio: float, ignore: int, rng):
    """Random crop; up to 10 draws until >1 class and none above ``cat_max_ratio`` (mmseg)."""
    H, W = label.shape
    ch, cw = min(crop, H), min(crop, W)

    def draw():
        y, x = rng.randint(0, H - ch), rng.randint(0, W - cw)
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            patch = label[y : y + ch, x : x + cw]
            cnt = torch.bincount(patch[patch != ignore].flatten())
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[:, y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


def _rgb_to_hsv(img: torch.Tensor):
    """(3, H, W) in 0..255 -> h in [0, 1), s in [0, 1], v in 0..255."""
    r, g, b = img
    v, _ = img.max(0)
    delta = v - img.min(0)[0]
    s = torch.where(v > 0, delta / v.clamp_min(1e-6), torch.zeros_like(v))
    d = delta.clamp_min(1e-6)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return h, s, v


def _hsv_to_rgb(h, s, v) -> torch.Tensor:
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    r = torch.stack([v, q, p, p, t, v]).gather(0, i[None])[0]
    g = torch.stack([t, v, v, q, p, p]).gather(0, i[None])[0]
    b = torch.stack([p, p, t, v, v, q]).gather(0, i[None])[0]
    return torch.stack([r, g, b])


def photometric_distortion(img: torch.Tensor, cfg: SegAugConfig, rng) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion: brightness, contrast (before or after), saturation,
    hue, each with probability 0.5; values rounded and clipped to 0..255 after each step."""

    def clip(x):
        return x.round().clamp_(0, 255)

    if rng.random() < 0.5:
        img = clip(img + rng.uniform(-cfg.brightness_delta, cfg.brightness_delta))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = clip(img * rng.uniform(*cfg.contrast_range))
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        h, s, v = _rgb_to_hsv(img)
        if do_sat:
            s = (s * rng.uniform(*cfg.saturation_range)).clamp_(0, 1)
        if do_hue:
            h = (h + rng.randint(-cfg.hue_delta, cfg.hue_delta - 1) / 180.0) % 1.0
        img = clip(_hsv_to_rgb(h, s, v))
    if not contrast_first and rng.random() < 0.5:
        img = clip(img * rng.uniform(*cfg.contrast_range))
    return img


def normalize(img: torch.Tensor, cfg: SegAugConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(3, 1, 1) * 255.0
    std = torch.tensor(cfg.std).view(3, 1, 1) * 255.0
    return (img - mean) / std


class SegTrainTransform:
    """(image, reduced label) -> (image (3, c, c) normalised float, label (c, c) long)."""

    def __init__(
        self, cfg: SegAugConfig, ignore_index: int = 255, rng: random.Random | None = None
    ):
        self.cfg, self.ignore, self.rng = cfg, ignore_index, rng or random

    def __call__(self, img, label):
        cfg, rng = self.cfg, self.rng
        img, label = to_tensor_image(img), torch.as_tensor(np.asarray(label)).long()
        ratio = rng.uniform(*cfg.ratio_range)
        scale = [s * ratio for s in cfg.img_scale]
        img, label = resize_pair(img, label, rescale_size(*label.shape, scale))
        img, label = random_crop(img, label, cfg.crop_size, cfg.cat_max_ratio, self.ignore, rng)
        if rng.random() < cfg.flip_prob:
            img, label = img.flip(-1), label.flip(-1)
        if cfg.photometric:
            img = photometric_distortion(img, cfg, rng)
        img = normalize(img, cfg)
        c = cfg.crop_size
        ph, pw = c - img.shape[1], c - img.shape[2]
        if ph > 0 or pw > 0:  # smaller than the crop: pad (image 0 = mean, labels ignored)
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            label = F.pad(label, (0, pw, 0, ph), value=self.ignore)
        return img, label


class SegEvalTransform:
    """(image, reduced label) -> (image resized keep-ratio to img_scale, normalised; label
    at its original size). ``img_scale`` None keeps the image size."""

    def __init__(self, cfg: SegAugConfig, resize: bool = True):
        self.cfg, self.resize = cfg, resize

    def __call__(self, img, label):
        img, label = to_tensor_image(img), torch.as_tensor(np.asarray(label)).long()
        if self.resize:
            size = rescale_size(img.shape[1], img.shape[2], self.cfg.img_scale)
            if size != tuple(img.shape[1:]):
                img, _ = resize_pair(img, None, size)
        return normalize(img, self.cfg), label


def collate_eval(batch):
    """Evaluation batches keep per-image sizes: -> (list of images, list of labels)."""
    imgs, labels = zip(*batch)
    return list(imgs), list(labels)
