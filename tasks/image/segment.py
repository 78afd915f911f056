"""ADE20K semantic segmentation: UperNet on a NEPA backbone (``segment_ade20k``).

The protocol is the standard BEiT/MAE one (NEPA publishes none): 150 classes, labels reduced
by one with 0 ignored; 512 crops from a random 0.5-2.0 resize of 2048x512, category max ratio
0.75, flip, photometric distortion; AdamW lr 1e-4, weight decay 0.05, layer decay 0.65 (B),
drop path 0.1, 1500 warmup iterations then poly decay over 160k iterations at batch 16;
evaluation single-scale sliding window 512 / stride 341 (multi-scale + flip optional).
Every number is a config entry (configs/image/ade20k_upernet_vit_{b,l}14.yaml).

With ``data.root`` empty the task trains on generated scenes (4 classes), for smoke tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn
from unipred.tasks.image.seg_data import SyntheticScenes, segmentation_dataset
from unipred.tasks.image.seg_metrics import MeanAccuracy, MeanIoU, PixelAccuracy
from unipred.tasks.image.seg_transforms import (
    SegAugConfig,
    SegEvalTransform,
    SegTrainTransform,
    collate_eval,
)
from unipred.tasks.image.segmentation import SegHeadConfig, SegmentationModel

from unipred.registry import TASKS
from unipred.task import DataConfig, Task


@dataclass
class SegEvalConfig:
    mode: str = "slide"  # slide | whole
    crop: int = 512
    stride: int = 341
    scales: list[float] = field(default_factory=lambda: [1.0])  # MS: [0.5, 0.75, ..., 1.75]
    flip: bool = False
    resize: bool = True  # keep-ratio resize to aug.img_scale first (mmseg's test pipeline)
    window_batch: int = 8  # windows per forward pass


@dataclass
class SegmentData(DataConfig):
    """root / val_root: an ADEChallengeData2016 folder or packed shards of one split."""

    reduce_zero_label: bool = True  # ADE20K: 1..150 -> 0..149, 0 -> ignore
    skip_bad: bool = False  # folder layout: drop (and list) missing/mismatched pairs
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    aug: SegAugConfig = field(default_factory=SegAugConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    synthetic_size: int = 64  # generated scenes, used when root is ""
    synthetic_train: int = 2000
    synthetic_val: int = 100


@TASKS.register("segment_ade20k")
class SegmentADE20K(Task):
    """ADE20K semantic segmentation: UperNet on the NEPA backbone (image modality)."""

    data_config: ClassVar[type[DataConfig]] = SegmentData
    monitor: ClassVar[str | None] = "val/mIoU"
    monitor_mode: ClassVar[str] = "max"

    def build_model(self) -> nn.Module:
        return SegmentationModel(self.model_config(head="none"), self.cfg.data.head)

    def build_dataset(self, split: str):
        d, train = self.cfg.data, split == "train"
        ign = d.head.ignore_index
        if not d.root:
            n = d.synthetic_train if train else d.synthetic_val
            if d.head.num_classes < SyntheticScenes.num_classes:
                raise ValueError(f"data.head.num_classes={d.head.num_classes}: generated scenes "
                                 f"(data.root empty) have {SyntheticScenes.num_classes} classes")  # fmt: skip
            seed = self.cfg.seed + (0 if train else 7919)  # disjoint train / val scenes
            return SyntheticScenes(n, d.synthetic_size, seed) if n > 0 else None
        spec = d.root if train else d.val_root
        if not spec:
            return None
        tf = SegTrainTransform(d.aug, ign) if train else SegEvalTransform(d.aug, d.eval.resize)
        return segmentation_dataset(spec, "training" if train else "validation", tf, train,
                                    d.reduce_zero_label, d.skip_bad, ign, d.shuffle_buffer,
                                    self.cfg.seed)  # fmt: skip

    def collate_fn(self, split: str):
        return None if split == "train" else collate_eval

    def build_metrics(self) -> dict[str, Any]:
        h = self.cfg.data.head
        return {name: cls(h.num_classes, h.ignore_index)
                for name, cls in (("mIoU", MeanIoU), ("mAcc", MeanAccuracy), ("aAcc", PixelAccuracy))}  # fmt: skip

    def training_step(self, model, batch):
        x, y = batch
        loss, logs = model.loss(model(x), y)
        logs["loss"] = loss.detach()
        return loss, logs

    def validation_step(self, model, batch, metrics):
        """Per image: (sliding-window) prediction at the label's size, metrics updated."""
        e = self.cfg.data.eval
        imgs, labels = batch
        was_training = model.training
        model.eval()  # the EMA copy is not switched by Lightning
        for img, lab in zip(imgs, labels):
            probs = model.predict(img[None], lab.shape[-2:], e.mode, e.crop, e.stride, e.scales,
                                  e.flip, e.window_batch)  # fmt: skip
            pred = probs.argmax(dim=1)
            for m in metrics.values():
                m.update(pred, lab[None].to(pred.device))
        model.train(was_training)
        return {}

    def batch_size(self, batch) -> int:
        return len(batch[0])

    @classmethod
    def smoke_config(cls) -> dict[str, Any]:
        return {"model.name": "nepa_debug", "trainer.global_batch": 4,
                "data.head.layers": [0, 0, 1, 1], "data.head.num_classes": 4,
                "data.head.channels": 16, "data.head.aux_channels": 8,
                "data.synthetic_size": 32, "data.synthetic_train": 8, "data.synthetic_val": 2,
                "data.eval.crop": 24, "data.eval.stride": 16, "data.num_workers": 0}  # fmt: skip
