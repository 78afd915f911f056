"""Segmentation metrics from one confusion matrix, summed across DDP ranks.

``MeanIoU``, ``MeanAccuracy`` and ``PixelAccuracy`` share the same state, so inside a
``torchmetrics.MetricCollection`` (compute groups on, the default) the matrix is updated once.
Definitions follow mmseg: per class IoU = TP / (TP + FP + FN), accuracy = TP / (TP + FN);
classes that never occur (NaN) are left out of the means; pixel accuracy = sum TP / labelled.
All values are fractions in [0, 1].
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection


class ConfusionMatrix(Metric):
    """(num_classes, num_classes) counts, rows = ground truth, columns = prediction."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kw):
        super().__init__(**kw)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state(
            "confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """preds: (B, H, W) class ids or (B, C, H, W) scores; target: (B, H, W) with ignore."""
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        target = target.long()
        keep = target != self.ignore_index
        t, p = target[keep], preds[keep].long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target ids must be in [0, {self.num_classes}) or "
                             f"{self.ignore_index}, got {t.min().item()}..{t.max().item()}")  # fmt: skip
        n = self.num_classes
        self.confmat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def compute(self) -> torch.Tensor:
        return self.confmat


def _stats(cm: torch.Tensor):
    cm = cm.double()
    tp = cm.diag()
    return tp, cm.sum(dim=1), cm.sum(dim=0)  # true positives, ground-truth, predicted


class MeanIoU(ConfusionMatrix):
    def compute(self) -> torch.Tensor:
        tp, gt, pred = _stats(self.confmat)
        return (tp / (gt + pred - tp)).nanmean().float()  # 0/0 = NaN: class never seen


class MeanAccuracy(ConfusionMatrix):
    def compute(self) -> torch.Tensor:
        tp, gt, _ = _stats(self.confmat)
        return (tp / gt).nanmean().float()


class PixelAccuracy(ConfusionMatrix):
    def compute(self) -> torch.Tensor:
        tp, gt, _ = _stats(self.confmat)
        return (tp.sum() / gt.sum().clamp_min(1)).float()


def per_class_iou(confmat: torch.Tensor) -> torch.Tensor:
    """(C,) IoU per class, NaN for classes absent from both labels and predictions."""
    tp, gt, pred = _stats(confmat)
    return (tp / (gt + pred - tp)).float()


def segmentation_metrics(num_classes: int, ignore_index: int = 255, prefix: str = "val/"):
    """mIoU, mAcc and aAcc (pixel accuracy) sharing one confusion matrix."""
    return MetricCollection(
        {
            "mIoU": MeanIoU(num_classes, ignore_index),
            "mAcc": MeanAccuracy(num_classes, ignore_index),
            "aAcc": PixelAccuracy(num_classes, ignore_index),
        },
        prefix=prefix,
    )
