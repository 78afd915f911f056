"""Fashion-MNIST tasks (28x28 grayscale, 10 classes) for the laptop demo (`unipred demo image`).

- ``fmnist_pretrain``: NEPA pretraining on the training images; labels are never used.
- ``fmnist_classify`` with ``data.mode``:
  * ``finetune`` — the whole model trains, optionally on a labelled subset
    (``data.labels_per_class``: that many training images per class, chosen by
    ``data.subset_seed`` only, so every run of a comparison sees the same images);
  * ``probe`` — MAE's linear probe (head "probe": BatchNorm without affine + linear on the
    mean of the frozen backbone's final-norm patch tokens). The frozen backbone runs in eval
    mode on un-augmented images, so its features are deterministic: they are computed once
    per training image and cached (``data.cache_features``), and later epochs train the
    linear layer alone;
  * ``eval`` — validation only (``unipred eval``).

Data: ``data.root`` is a folder with the four IDX files (Debian's ``dataset-fashion-mnist``
installs them in /usr/share/datasets/fashion-mnist; torchvision's download folder works
too). Validation always uses the 10,000 test images of that folder (``data.validate``).
``data.root == ""`` generates a small stand-in set (stripes whose angle and frequency are the
class) so the smoke tests run anywhere. Training augmentation: random shift (pad
``data.shift`` pixels, random 28x28 crop) and horizontal flip, done per batch in the collate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from unipred.tasks.image.checks import check_patch, check_tokenizer, model_shape
from unipred.tasks.image.fmnist_data import CLASSES, read_split

from unipred.task import DataConfig, DataSource, per_class_indices, register_data

log = logging.getLogger(__name__)


@dataclass
class FMNISTData(DataConfig):
    """Fashion-MNIST: folder, subsets, epoch length and augmentation."""

    root: str = ""  # folder with the IDX files; "" = generated stand-in data (smoke tests)
    num_workers: int = 0  # the whole set is in memory: the main process keeps up
    train_samples: int = 0  # use this many training images (seeded subset; 0 = all 60,000)
    val_samples: int = 0  # evaluate on the first N test images (0 = all 10,000)
    validate: bool = True  # validate on the test split (at the end of each epoch)
    subset_seed: int = 0  # picks train_samples / labels_per_class; independent of the run seed
    repeat: int = 1  # one epoch = this many passes over the (sub)set, freshly augmented
    shift: int = 2  # random shift: pad by this many pixels, random 28x28 crop (0 = off)
    hflip: bool = True  # random horizontal flip
    mean: float = 0.5  # pixel normalisation (x / 255 - mean) / std
    std: float = 0.5
    generated_samples: int = 256  # only when root == "": generated images per split


def generated(n: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in data: (uint8 (n, size, size), labels) of noisy stripes; the class sets their
    angle and frequency, so a classifier can learn it and a predictor can model it."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(CLASSES)
    ang = (y % 5).float() * math.pi / 5 + 0.2 * torch.rand(n, generator=g)
    freq = 0.35 + 0.35 * (y // 5).float()
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    proj = torch.cos(ang)[:, None, None] * xx + torch.sin(ang)[:, None, None] * yy
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    img = 0.5 + 0.4 * torch.sin(freq[:, None, None] * proj + phase)
    img = img + 0.1 * torch.randn(n, size, size, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8), y


class ArrayImages(torch.utils.data.Dataset):
    """In-memory images (uint8 (N, H, W)) and labels; ``repeat`` passes per epoch. Items are
    (image (1, H, W) uint8, label) or, with ``with_index``, (image, label, index). Reading an
    item draws nothing random (the augmentation is in the collate, seeded per batch)."""

    per_sample_random = False  # unipred.data.seeding.SeededDataset skips per-sample seeding

    def __init__(self, images, labels, repeat: int = 1, with_index: bool = False):
        if repeat < 1:
            raise ValueError(f"data.repeat={repeat} must be >= 1")
        self.images, self.labels, self.repeat, self.with_index = images, labels, repeat, with_index

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def __getitem__(self, i: int):
        j = i % len(self.images)
        item = (self.images[j][None], int(self.labels[j]))
        return (*item, j) if self.with_index else item


class Collate:
    """Stack, normalise and (training) augment a batch: random shift + horizontal flip."""

    def __init__(self, data: FMNISTData, train: bool):
        self.d, self.train = data, train

    def __call__(self, items):
        x = torch.stack([it[0] for it in items]).float().div_(255)  # (B, 1, H, W)
        if self.train and self.d.shift > 0:
            x = random_shift(x, self.d.shift)
        if self.train and self.d.hflip:
            flip = torch.rand(x.shape[0]) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = (x - self.d.mean) / self.d.std
        rest = [torch.tensor([it[k] for it in items]) for k in range(1, len(items[0]))]
        return (x, *rest)


def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) by ``pad`` and crop a random H x W window per image."""
    B, C, H, W = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy, ox = torch.randint(0, 2 * pad + 1, (2, B))
    rows = (oy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
    b = torch.arange(B)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2).contiguous()


def load_arrays(data, split: str, seed: int):
    """(images, labels) of "train" or "val" (the test split), with the configured subsets."""
    if data.val_root:
        raise ValueError(
            "data.val_root is not used by the Fashion-MNIST tasks: they validate on the test "
            "split of data.root (data.validate=false turns validation off)"
        )
    if not data.root:
        log.warning("data.root is empty: using generated stand-in images (smoke test only)")
        x, y = generated(data.generated_samples, seed + (0 if split == "train" else 7919))
    else:
        x, y = read_split(data.root, "train" if split == "train" else "test")
    n = data.train_samples if split == "train" else data.val_samples
    if split == "train" and 0 < n < len(x):  # a seeded subset keeps the classes balanced-ish
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(data.subset_seed))
        x, y = x[idx[:n]], y[idx[:n]]
    elif 0 < n < len(x):
        x, y = x[:n], y[:n]
    k = getattr(data, "labels_per_class", 0)
    if split == "train" and k > 0:
        x, y = per_class_subset(x, y, k, data.subset_seed)
    return x, y


def per_class_subset(x, y, k: int, seed: int):
    """``k`` images of every class, chosen by ``seed`` alone (ValueError if a class has fewer);
    the same rule as every classify dataset's (unipred.task.per_class_indices)."""
    keep = torch.tensor(per_class_indices(y.tolist(), k, seed), dtype=torch.long)
    return x[keep], y[keep]


def check_fmnist_config(cfg) -> None:
    """28x28 grey images: the patch must divide 28 and the model must take one channel."""
    tokenizer, patch, chans = model_shape(cfg)
    check_tokenizer(tokenizer, "image", cfg.model.name)
    if tokenizer != "image":
        return
    check_patch(28, patch, "the Fashion-MNIST image size")
    if chans != 1:
        raise ValueError(
            f"model.tokenizer_args.in_chans={chans}: Fashion-MNIST images are grey; set it to 1"
        )


@register_data("fmnist")
class FashionMNIST(DataSource):
    """Fashion-MNIST (28x28 grey, 10 classes) from its IDX files (generated if no root)."""

    config = FMNISTData
    applies_label_budget = True  # load_arrays cuts the subset, ArrayImages repeats it
    smoke = {
        "model.name": "nepa_debug",
        "model.tokenizer_args.in_chans": 1,
        "model.tokenizer_args.patch_size": 7,
        "trainer.global_batch": 4,
        "data.generated_samples": 8,
    }

    @classmethod
    def check_config(cls, cfg, objective):
        check_fmnist_config(cfg)

    def num_classes(self):
        return len(CLASSES)

    def build(self, split, augment):
        d = self.cfg.data
        if split != "train" and not d.validate:
            return None
        x, y = load_arrays(d, split, self.cfg.seed)
        # repeats are fresh augmentations: an unaugmented read (probe features) is one pass
        return ArrayImages(x, y, d.repeat if split == "train" and augment else 1)

    def collate(self, split, augment, num_classes=None):
        return Collate(self.cfg.data, train=augment)


FMNISTPretrain = FashionMNIST.tasks["pretrain"]
FMNISTClassify = FashionMNIST.tasks["classify"]
