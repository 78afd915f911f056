"""Image data of the NEPA reference (ImageNet-style) and its two tasks, the generic objectives
of unipred.task on the ``image`` data source:

- ``image_pretrain``: next-embedding pretraining on an image folder or webdataset shards
  (labels unused); augmentation RandomResizedCrop bilinear (0.08, 1) + flip, as the release.
- ``image_classify`` with ``data.mode``:
  * ``finetune`` — the whole model trains (head "mean": patch-token mean -> fc_norm ->
    linear), RandAugment + RandomErasing + Mixup/CutMix as the release (configs/image/);
  * ``probe`` — MAE's linear probe: the backbone is frozen and run in eval mode under
    no_grad (no drop path, no RoPE coordinate augmentation), the head is BatchNorm without
    affine + linear on the mean of the final-norm patch tokens (head "probe");
  * ``eval`` — validation only (``unipred eval``), top-1/top-5 from torchmetrics.

``data.root`` and ``data.val_root`` both "" generate a few synthetic images (for smoke tests),
with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from unipred.tasks.image.checks import (
    ToChannels,
    channel_stats,
    check_channels,
    check_patch,
    check_tokenizer,
    classes_in,
    model_shape,
    resolve_from_data,
)
from unipred.tasks.image.data import ShardDataset, image_dataset
from unipred.tasks.image.device_decode import DeviceDecodeTransform
from unipred.tasks.image.transforms import (
    ImageAugConfig,
    MixupCollate,
    eval_transform,
    train_transform,
)

from unipred.data.accounting import COUNTER
from unipred.task import DataConfig, DataSource, register_data

log = logging.getLogger(__name__)
IMAGENET_CLASSES = 1000  # the class count when neither the config nor the data say


@dataclass
class ImageData(DataConfig):
    """Where the images are and how they are augmented (see unipred.tasks.image.data)."""

    label_file: str = ""  # labels of a flat training folder (rarely needed)
    val_label_file: str = ""  # labels of a flat val folder: "name label" or LOC_val_solution.csv
    classes_file: str = ""  # fixes the class order of a flat folder (the packer's classes.txt)
    num_samples: int = 0  # streaming: samples per epoch when the shards have no meta.json
    min_size: int = 8  # images with a side below this are skipped (and counted)
    synthetic_samples: int = 64  # only when root is "": generated images per split
    # pretraining only: workers pass JPEG bytes + crop/flip draws, the batch is decoded,
    # cropped and resized on the training device (nvJPEG) -- for CPU-starved GPU nodes
    decode_on_device: bool = False
    aug: ImageAugConfig = field(default_factory=ImageAugConfig)


class SyntheticImages(torch.utils.data.Dataset):
    """Smoke-test stand-in: PIL images whose mean colour encodes the label."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int, transform=None):
        self.n, self.size, self.k, self.seed, self.transform = n, size, num_classes, seed, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(self.seed * 100_003 + i)
        y = i % self.k
        base = np.array([(37 * y) % 256, (91 * y) % 256, (53 * y) % 256], dtype=np.float32)
        img = base + rng.normal(0, 30, (self.size, self.size + 8, 3))
        img = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        return (self.transform(img) if self.transform else img), y


def check_image_config(cfg, classify: bool) -> None:
    """Shape mistakes of an image task config, one line each (see tasks/image/checks.py)."""
    d = cfg.data
    tokenizer, patch, chans = model_shape(cfg)
    check_tokenizer(tokenizer, "image", cfg.model.name)
    if tokenizer != "image":
        return  # a plugin tokenizer: its own shapes
    for line in resolve_from_data(cfg, patch):  # 0 = "as the data" (the small recipe)
        log.info("from the data: %s", line)
    tokenizer, patch, chans = model_shape(cfg)
    if _unresolved(cfg):
        return  # sizes "as the data" without data: _build and adapt_model name it
    check_patch(d.aug.img_size, patch, "data.aug.img_size")
    if chans not in (1, 3):
        raise ValueError(f"model.tokenizer_args.in_chans={chans}: image data has 1 or 3 channels")
    channel_stats(d.aug.mean, chans, "data.aug.mean")
    channel_stats(d.aug.std, chans, "data.aug.std")
    if chans == 1 and d.decode_on_device:
        raise ValueError("data.decode_on_device decodes to RGB: use it with in_chans=3")
    check_channels(d.root, chans, "data.root")
    check_channels(d.val_root, chans, "data.val_root")
    if not classify:
        return
    n = d.num_classes or cfg.model.num_classes or (0 if d.root else IMAGENET_CLASSES)
    if not n:
        n = classes_in(d.root, d.label_file, d.classes_file) or 0
    for key, spec, labels in (("data.root", d.root, d.label_file),
                              ("data.val_root", d.val_root, d.val_label_file)):  # fmt: skip
        found = classes_in(spec, labels, d.classes_file) if spec else None
        if found and n and found > n:
            raise ValueError(
                f"{key} holds {found} classes but the model has {n} outputs (data.num_classes): "
                f"set data.num_classes={found}"
            )


def _unresolved(cfg) -> str:
    """The keys left at 0 ("as the data") because no data was named, "" when none is."""
    aug = getattr(cfg.data, "aug", None)  # Fashion-MNIST's data section has none (28 px)
    pairs = (("data.aug.img_size", aug.img_size if aug is not None else None),
             ("model.tokenizer_args.in_chans", model_shape(cfg)[2]))  # fmt: skip
    return " and ".join(k for k, v in pairs if v == 0)


def _need_resolved(cfg) -> None:
    keys = _unresolved(cfg)
    if keys:
        raise ValueError(f"{keys}=0 (from the data) needs data.root: set it, or set {keys}")


def _aug(cfg):
    """The config's augmentation with mean/std for the model's channel count."""
    aug, chans = cfg.data.aug, model_shape(cfg)[2]
    mean, std = (
        channel_stats(aug.mean, chans, "data.aug.mean"),
        channel_stats(aug.std, chans, "data.aug.std"),
    )
    return dataclasses.replace(aug, mean=mean, std=std), chans


def _build(cfg, split: str, num_classes: int, augment: bool):
    """The dataset of ``split`` (None when the split is absent); ``augment`` picks the
    training or the eval transform."""
    d, train = cfg.data, split == "train"
    _need_resolved(cfg)
    aug, chans = _aug(cfg)
    tf = train_transform(aug) if augment else eval_transform(aug)
    tf = T.Compose([ToChannels(chans), tf])
    if augment and d.decode_on_device:
        tf = DeviceDecodeTransform.from_aug(d.aug)
    spec = d.root if train else d.val_root
    if not d.root and not d.val_root:
        log.warning(
            "data.root is empty: using %d synthetic images (smoke test only)", d.synthetic_samples
        )
        seed = cfg.seed + (0 if train else 7919)
        side = d.aug.img_size + d.aug.img_size // 4
        return SyntheticImages(d.synthetic_samples, side, max(num_classes, 1), seed, tf)
    if not spec:
        return None
    ds = image_dataset(
        spec,
        tf,
        training=train,
        label_file=d.label_file if train else d.val_label_file,
        classes_file=d.classes_file,
        shuffle_buffer=d.shuffle_buffer,
        seed=cfg.seed,
        num_samples=d.num_samples if train else None,
        min_size=d.min_size,
    )
    if train and isinstance(ds, ShardDataset) and ds.num_samples is None:
        if cfg.trainer.max_steps <= 0:
            raise ValueError(
                f"data.root={spec!r}: the shards have no meta.json, so the epoch length is "
                "unknown; set data.num_samples (or trainer.max_steps)"
            )
    return ds


def _data_logs() -> dict:
    """Running bad-sample totals of this process (per-epoch values: accounting.BadSampleLogger)."""
    snap = COUNTER.snapshot()
    return {
        "data/skipped": torch.tensor(float(snap["skipped/total"])),
        "data/converted": torch.tensor(float(snap["converted/total"])),
    }


@register_data("image")
class ImageFolders(DataSource):
    """ImageNet-style images: class folders, a flat folder + labels, or webdataset shards.

    Synthetic images when data.root and data.val_root are both empty."""

    config = ImageData
    smoke = {
        "model.name": "nepa_debug",
        "trainer.global_batch": 4,
        "data.aug.img_size": 32,
        "data.synthetic_samples": 8,
        "data.num_workers": 0,
    }

    def __init__(self, cfg, objective="pretrain"):
        super().__init__(cfg, objective)
        if objective != "pretrain" and getattr(cfg.data, "decode_on_device", False):
            raise ValueError("data.decode_on_device is for image_pretrain only: fine-tuning's "
                             "RandAugment, erasing and Mixup/CutMix run on the CPU workers")  # fmt: skip

    @classmethod
    def check_config(cls, cfg, objective):
        check_image_config(cfg, classify=objective == "classify")

    @classmethod
    def check_run(cls, cfg, objective):
        keys = _unresolved(cfg)
        if keys:  # 0 = "as the data", and no data named to read it from
            raise ValueError(
                f"data.root is empty: {keys}=0 are read from the data; give data.root=DIR/train "
                f"(a folder of class sub-folders: docs/small-data.md) or set {keys}"
            )

    @classmethod
    def smoke_config(cls, objective):
        return {**cls.smoke, "data.num_classes": 4} if objective == "classify" else cls.smoke

    def num_classes(self):
        """The classes of the training data (class folders, the shards' meta.json, a classes
        or label file), else of the val data when no training data is named; None when the
        data do not tell; ImageNet's 1000 for generated images."""
        d = self.cfg.data
        if d.root:
            return classes_in(d.root, d.label_file, d.classes_file)
        if d.val_root:
            return classes_in(d.val_root, d.val_label_file, d.classes_file)
        return IMAGENET_CLASSES

    def build(self, split, augment):
        n = 1  # synthetic images: labels as many as the classifier has
        if self.objective != "pretrain":
            d = self.cfg.data
            n = (
                getattr(d, "num_classes", 0)
                or self.cfg.model.num_classes
                or self.num_classes()
                or 1
            )
        return _build(self.cfg, split, n, augment)

    def collate(self, split, augment, num_classes=None):
        d = self.cfg.data
        if augment and d.decode_on_device:
            return DeviceDecodeTransform.from_aug(d.aug).collate
        if augment and num_classes and d.aug.uses_mixup:
            return MixupCollate(d.aug, num_classes, d.label_smoothing)
        return None

    def adapt_model(self, mc):
        _need_resolved(self.cfg)
        return mc

    def step_logs(self):
        return _data_logs()


ImagePretrain = ImageFolders.tasks["pretrain"]
ImageClassify = ImageFolders.tasks["classify"]
