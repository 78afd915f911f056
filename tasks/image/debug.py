"""Debug tasks on procedurally generated images (no download, deterministic by seed).

Each sample is a coloured shape (square, disc, triangle, cross) of random size, position and
colour on a noisy background; its class is the shape. Sample i is generated from
``seed + i`` alone, so the data set is map-style and identical on every run and rank.

- ``debug_image_pretrain``: next-embedding pretraining of ``nepa_debug`` (configs/debug/).
- ``debug_image_classify``: 4-way shape classification with the mean-pool head.
- ``debug_image_segment``: per-pixel segmentation, 5 classes (background + the 4 shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unipred.task import DataConfig, DataSource, check_patch, model_tokenizer, register_data

SHAPES = ("square", "disc", "triangle", "cross")


class ShapesDataset(torch.utils.data.Dataset):
    """(image (3, S, S) in [-1, 1], label) pairs generated from ``seed + index``; with
    ``dense`` the label is the (S, S) map: 0 background, 1 + shape inside the shape."""

    def __init__(self, size: int = 32, length: int = 256, seed: int = 0, dense: bool = False):
        self.size, self.length, self.seed, self.dense = size, length, seed, dense

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.size
        label = int(torch.randint(len(SHAPES), (), generator=g))
        r = float(torch.empty(()).uniform_(0.15, 0.35, generator=g)) * s
        cy, cx = (torch.rand(2, generator=g) * (s - 2 * r) + r).tolist()
        yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
        dy, dx = yy - cy, xx - cx
        if label == 0:
            mask = (dy.abs() < r) & (dx.abs() < r)
        elif label == 1:
            mask = dy**2 + dx**2 < r**2
        elif label == 2:
            mask = (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2)
        else:
            mask = ((dy.abs() < r / 3) & (dx.abs() < r)) | ((dx.abs() < r / 3) & (dy.abs() < r))
        bg = torch.rand(3, 1, 1, generator=g) * 0.4
        fg = 0.5 + torch.rand(3, 1, 1, generator=g) * 0.5
        img = bg + 0.05 * torch.randn(3, s, s, generator=g)
        img = torch.where(mask, fg.expand(3, s, s), img)
        img = img.clamp(0, 1) * 2 - 1
        return (img, mask.long() * (label + 1)) if self.dense else (img, label)


@dataclass
class DebugImageData(DataConfig):
    image_size: int = 32
    train_samples: int = 256
    val_samples: int = 64
    num_workers: int = 0


@register_data("debug_image", objectives=("pretrain", "classify", "segment"))
class DebugShapes(DataSource):
    """Generated shapes (square, disc, triangle, cross), 4 classes, deterministic by seed;
    for segmentation 5 per-pixel classes (background + the shapes)."""

    config = DebugImageData
    smoke = {
        "model.name": "nepa_debug",
        "trainer.global_batch": 4,
        "data.train_samples": 16,
        "data.val_samples": 8,
    }

    def num_classes(self):
        return len(SHAPES) + (self.objective == "segment")

    @classmethod
    def check_config(cls, cfg, objective):
        """The generated side must be a multiple of an image tokenizer's patch (checked when
        the config loads: before any run folder exists)."""
        tok, args = model_tokenizer(cfg)
        if tok == "image":
            check_patch(cfg.data.image_size, args.get("patch_size", 16), "data.image_size")

    def build(self, split, augment):
        d = self.cfg.data
        n = d.train_samples if split == "train" else d.val_samples
        if n <= 0:
            return None
        # different seeds per split, so validation images are never training images
        seed = self.cfg.seed + (0 if split == "train" else 7919)
        return ShapesDataset(d.image_size, n, seed=seed, dense=self.objective == "segment")


DebugImagePretrain = DebugShapes.tasks["pretrain"]
DebugImageClassify = DebugShapes.tasks["classify"]
DebugImageSegment = DebugShapes.tasks["segment"]
