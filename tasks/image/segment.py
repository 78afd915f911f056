"""ADE20K semantic segmentation: the ``ade20k`` data source of the generic segmentation
objective (unipred.task.segment; task ``segment_ade20k``) and the image modality's ``upernet``
decoder (tasks/image/segmentation.py).

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

from torch import nn
from unipred.tasks.image.seg_data import SyntheticScenes, segmentation_dataset
from unipred.tasks.image.seg_transforms import (
    SegAugConfig,
    SegEvalTransform,
    SegTrainTransform,
    collate_eval,
)
from unipred.tasks.image.segmentation import SegHeadConfig, SegmentationModel

from unipred.task import DataSource, register_data
from unipred.task.segment import DECODERS, SegmentData


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
class ADE20KData(SegmentData):
    """root / val_root: an ADEChallengeData2016 folder or packed shards of one split."""

    decoder: str = "upernet"  # the recipe's; data.decoder=linear for a linear head
    reduce_zero_label: bool = True  # ADE20K: 1..150 -> 0..149, 0 -> ignore
    skip_bad: bool = False  # folder layout: drop (and list) missing/mismatched pairs
    head: SegHeadConfig = field(default_factory=SegHeadConfig)  # the upernet decoder's
    aug: SegAugConfig = field(default_factory=SegAugConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    synthetic_size: int = 64  # generated scenes, used when root is ""
    synthetic_train: int = 2000
    synthetic_val: int = 100


@DECODERS.register("upernet")
def upernet_decoder(mc, num_classes: int, task) -> nn.Module:
    """The BEiT/MAE UperNet (+ FCN auxiliary head) on four blocks of an image backbone; its
    settings are ``data.head`` and, for evaluation, ``data.eval`` (where the data source's
    config has them)."""
    d = task.cfg.data
    head = getattr(d, "head", None)
    if head is None:  # a source without UperNet settings: 4 blocks spread over the depth
        depth = mc.predictor.depth
        head = SegHeadConfig(layers=[max(round((i + 1) * depth / 4) - 1, 0) for i in range(4)])
    ev = getattr(d, "eval", None)
    inference = {} if ev is None else {k: getattr(ev, k) for k in
                                       ("mode", "crop", "stride", "scales", "flip", "window_batch")}  # fmt: skip
    return SegmentationModel(mc, head, num_classes, d.ignore_index, inference)


upernet_decoder.tokenizers = ("image",)  # SegmentTask.check_config refuses others


@register_data("ade20k", objectives=("segment",), tasks={"segment": "segment_ade20k"})
class ADE20K(DataSource):
    """ADE20K scene parsing (150 classes) from the release folder or packed shards; generated
    scenes (4 classes) when data.root is empty."""

    config = ADE20KData
    smoke = {"model.name": "nepa_debug", "trainer.global_batch": 4,
             "data.head.layers": [0, 0, 1, 1], "data.head.channels": 16,
             "data.head.aux_channels": 8, "data.synthetic_size": 32, "data.synthetic_train": 8,
             "data.synthetic_val": 2, "data.eval.crop": 24, "data.eval.stride": 16,
             "data.num_workers": 0}  # fmt: skip

    def num_classes(self):
        return 150 if self.cfg.data.root else SyntheticScenes.num_classes

    def build(self, split, augment):
        d, train = self.cfg.data, split == "train"
        ign = d.ignore_index
        if not d.root:
            n = d.synthetic_train if train else d.synthetic_val
            if d.num_classes and d.num_classes < SyntheticScenes.num_classes:
                raise ValueError(f"data.num_classes={d.num_classes}: generated scenes "
                                 f"(data.root empty) have {SyntheticScenes.num_classes} classes")  # fmt: skip
            seed = self.cfg.seed + (0 if train else 7919)  # disjoint train / val scenes
            return SyntheticScenes(n, d.synthetic_size, seed) if n > 0 else None
        spec = d.root if train else d.val_root
        if not spec:
            return None
        tf = SegTrainTransform(d.aug, ign) if augment else SegEvalTransform(d.aug, d.eval.resize)
        return segmentation_dataset(spec, "training" if train else "validation", tf, augment,
                                    d.reduce_zero_label, d.skip_bad, ign, d.shuffle_buffer,
                                    self.cfg.seed)  # fmt: skip

    def collate(self, split, augment, num_classes=None):
        # evaluation images keep their own sizes: a batch is a list of (image, label) samples
        return None if augment else collate_eval


SegmentADE20K = ADE20K.tasks["segment"]
