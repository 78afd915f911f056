"""Segmentation, written once for every tokenizer: a class for every position of the input.

``SegmentTask`` is the third generic objective (after pretraining and classification). A data
source that registers the objective ``"segment"`` (``register_data("x", objectives=(...,
"segment"))`` -> task ``x_segment``) yields ``(input, labels)`` where ``labels`` is a dense map
of class indices over the input's positions: (H, W) for an image, (T,) frames for audio or a
1-D signal, (T, H, W) for a video. Positions labelled ``data.ignore_index`` are not scored.

How tokens become a dense map, for any tokenizer: every token carries coordinates in [-1, 1]
(``Tokens.coords``), one per axis of the tokenizer's grid. The decoder's per-token logits are
placed on the grid those coordinates span (tokens that share a cell, e.g. the frequency bands
of one audio frame when the labels are per frame, are averaged) and the grid is resized
(linear / bilinear / trilinear) to the label map's size. ``DataSource.label_axes`` says which
coordinate axes the label map spans, in its order (default: all of them).

The decoder is a name in ``DECODERS`` (``data.decoder``): the core's ``linear`` (LayerNorm +
linear layer on each token of the final output, the standard "linear" segmentation head),
which works for every tokenizer; a modality may register more (the image modality's
``upernet``: the BEiT/MAE UperNet on a 2-D feature pyramid, used by the ADE20K recipe). A
decoder builder is ``fn(model_config, num_classes, task) -> nn.Module`` and the module is a
``NEPA`` subclass (backbone names unchanged, new weights under ``head.*``, so any pretrained
checkpoint loads through ``model.init``) whose ``forward(x)`` returns a ``SegmentOutput``.

``data.mode``: ``finetune`` (everything trains), ``probe`` (frozen backbone in eval mode, the
decoder alone trains: a linear segmentation probe with the ``linear`` decoder), ``eval``
(validation only). Metrics: mIoU, mAcc (mean class accuracy) and aAcc (accuracy over every
labelled position), from one confusion matrix summed over ranks (mmseg's definitions).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from unipred.base.registry import DECODERS
from unipred.nn.model import NEPA, ModelConfig
from unipred.task.base import DataConfig, Task

SEG_MODES = ("finetune", "probe", "eval")
_MODES_BY_NDIM = {1: "linear", 2: "bilinear", 3: "trilinear"}


@dataclass
class SegmentData(DataConfig):
    """The data section every segmentation task has (a data source's config adds its own)."""

    num_classes: int = 0  # 0 = what the data source reports
    ignore_index: int = 255  # label value that is never scored
    decoder: str = "linear"  # a DECODERS name: linear (any tokenizer) | upernet (images)
    # finetune: all weights train | probe: frozen backbone (eval mode), the decoder trains |
    # eval: validation only (unipred eval)
    mode: str = "finetune"
    dropout: float = 0.0  # before the linear decoder's classifier


@dataclass
class SegmentOutput:
    logits: torch.Tensor  # (B, C, *grid): the token grid or already the label map's size
    aux_logits: torch.Tensor | None = None  # an auxiliary head's, same layout (training only)
    aux_weight: float = 0.0  # its weight in the loss


def resize_to(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, C, *grid) -> (B, C, *size) by (bi/tri)linear interpolation (identity if equal)."""
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[2:]) == size:
        return logits
    nd = len(size)
    if logits.dim() - 2 != nd or nd not in _MODES_BY_NDIM:
        raise ValueError(
            f"segmentation: the decoder's grid has {logits.dim() - 2} axes "
            f"{tuple(logits.shape[2:])} but the label map has {nd} {size}; set the data "
            "source's label_axes to the coordinate axes its labels span"
        )
    return F.interpolate(logits, size=size, mode=_MODES_BY_NDIM[nd], align_corners=False)


def grid_cells(coords: torch.Tensor, valid=None, axes=None):
    """The grid of ``tokens_to_grid``: -> (flat cell index of every token, (B, N) or (1, N)
    for coordinates shared by the batch, and the grid's size per axis). One host sync per
    axis (the distinct values), so a model caches it for coordinates that do not change."""
    if coords.dim() == 2:
        coords = coords.unsqueeze(0)
    k = coords.shape[-1]
    axes = tuple(range(k)) if axes is None else tuple(axes)
    if not axes or any(not 0 <= a < k for a in axes):
        raise ValueError(f"label_axes={axes}: the tokenizer's coordinates have {k} axes")
    flat = torch.zeros(coords.shape[:2], dtype=torch.long, device=coords.device)
    sizes = []
    for a in axes:
        q = torch.round(coords[..., a].float() * 8192)  # tolerate float noise in the centres
        cells = torch.unique(q if valid is None else q.expand(valid.shape)[valid])
        idx = torch.searchsorted(cells, q.contiguous()).clamp_max(len(cells) - 1)
        flat = flat * len(cells) + idx
        sizes.append(len(cells))
    return flat, tuple(sizes)


def tokens_to_grid(values: torch.Tensor, coords: torch.Tensor, valid=None, axes=None, cells=None):
    """Per-token values (B, N, C) at ``coords`` ((N, k) or (B, N, k), in [-1, 1]) -> a dense
    grid (B, C, *G) over the coordinate axes ``axes`` (default all, in that order).

    The grid along an axis has one cell per distinct coordinate value of the real tokens of
    the batch (a regular patch grid: its patch centres), so it needs no knowledge of the
    tokenizer. Tokens that fall into the same cell (other axes dropped) are averaged; cells
    no real token reaches (padding of a shorter sample) stay 0. ``cells``: ``grid_cells``
    of these coordinates, when already known."""
    B, N, C = values.shape
    flat, sizes = cells if cells is not None else grid_cells(coords, valid, axes)
    flat = flat.expand(B, N)
    w = values.new_ones(B, N, 1) if valid is None else valid.to(values.dtype).unsqueeze(-1)
    n = math.prod(sizes)
    total = values.new_zeros(B, n, C).scatter_add_(1, flat.unsqueeze(-1).expand(-1, -1, C), values * w)  # fmt: skip
    count = values.new_zeros(B, n, 1).scatter_add_(1, flat.unsqueeze(-1), w)
    grid = total / count.clamp_min(1.0)
    return grid.transpose(1, 2).reshape(B, C, *sizes)


class LinearSegmenter(NEPA):
    """The ``linear`` decoder: a NEPA backbone, then LayerNorm + linear on every token of the
    final output; the per-token logits are laid on the token grid (``tokens_to_grid``)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, label_axes=None, dropout: float = 0.0):
        if cfg.head is not None or cfg.num_classes:
            cfg = dataclasses.replace(cfg, head=None, num_classes=0)
        super().__init__(cfg)
        self.objective = None  # a segmenter has no pretraining objective
        self.label_axes = None if label_axes is None else tuple(label_axes)
        self._cells = None  # grid_cells of the last shared coordinates (a cache, not state)
        dim = cfg.predictor.dim
        self.head = nn.Sequential(
            nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, num_classes)
        )
        nn.init.trunc_normal_(self.head[2].weight, std=0.01)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, x, causal=None) -> SegmentOutput:
        seq, coords, valid = self.embed(x)
        hidden = self.predictor(seq, coords, valid, causal)[:, self.n_prefix :]
        v = None if valid is None else valid[:, self.n_prefix :]
        cells = None
        if coords.dim() == 2 and v is None:  # the batch shares fixed coordinates (images)
            key = (coords.data_ptr(), tuple(coords.shape), coords.device)
            if self._cells is None or self._cells[0] != key:
                self._cells = (key, grid_cells(coords, None, self.label_axes))
            cells = self._cells[1]
        logits = self.head(hidden)
        return SegmentOutput(tokens_to_grid(logits, coords, v, self.label_axes, cells))

    @torch.no_grad()
    def predict(self, x, out_size) -> torch.Tensor:
        """Class probabilities (B, C, *out_size)."""
        return resize_to(self(x).logits.float(), out_size).softmax(dim=1)


@DECODERS.register("linear")
def linear_decoder(mc: ModelConfig, num_classes: int, task: SegmentTask) -> nn.Module:
    """LayerNorm + linear on every token, laid on the token grid: any tokenizer."""
    axes = task.source.label_axes if task.source is not None else None
    return LinearSegmenter(mc, num_classes, axes, task.cfg.data.dropout)


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """One clear line for labels outside [0, num_classes) that are not ``ignore_index`` (the
    loss would fail deep inside torch, on a GPU as an opaque device assert). It syncs with
    the host: the task runs it on its first training batch only."""
    real = labels[labels != ignore_index]
    if real.numel() and (int(real.max()) >= num_classes or int(real.min()) < 0):
        bad = int(real.max()) if int(real.max()) >= num_classes else int(real.min())
        raise ValueError(
            f"the labels hold class {bad} but the model has {num_classes} outputs "
            f"(data.num_classes={num_classes}): set data.num_classes="
            f"{max(bad + 1, num_classes)}, or mark the position with "
            f"data.ignore_index={ignore_index}"
        )


def segment_loss(out: SegmentOutput, labels: torch.Tensor, ignore_index: int):
    """Cross-entropy over the labelled positions (logits resized to the label map), plus
    ``aux_weight`` x the auxiliary head's; -> (loss, logs)."""
    labels = labels.long()
    size = labels.shape[1:]
    main = F.cross_entropy(resize_to(out.logits, size).float(), labels, ignore_index=ignore_index)
    logs = {"loss_decode": main.detach()}
    loss = main
    if out.aux_logits is not None and out.aux_weight > 0:
        aux = F.cross_entropy(resize_to(out.aux_logits, size).float(), labels, ignore_index=ignore_index)  # fmt: skip
        loss = loss + out.aux_weight * aux
        logs["loss_aux"] = aux.detach()
    return loss, logs


class SegmentTask(Task):
    """Semantic segmentation (``data.mode``: finetune | probe | eval) for any tokenizer.

    Batches are (inputs, labels): a tensor batch, or lists of single samples of different
    sizes (evaluated one by one at their own size). See the module docstring."""

    objective: ClassVar[str] = "segment"
    summary: ClassVar[str] = "Segmentation (data.decoder: linear | upernet ...; data.mode)"
    data_config: ClassVar[type[DataConfig]] = SegmentData
    monitor: ClassVar[str | None] = "val/mIoU"
    monitor_mode: ClassVar[str] = "max"
    _labels_checked: bool = False  # check_labels ran on the first training batch

    @classmethod
    def check_config(cls, cfg) -> None:
        d = cfg.data
        if d.mode not in SEG_MODES:
            raise ValueError(f"data.mode={d.mode!r}; use one of {list(SEG_MODES)}")
        if d.decoder not in DECODERS:
            raise ValueError(f"data.decoder={d.decoder!r}; known: {DECODERS.names()}")
        if d.num_classes < 0:
            raise ValueError(f"data.num_classes={d.num_classes} must be >= 0 (0 = from the data)")
        # a decoder may name the tokenizers it works on (``fn.tokenizers``: upernet's image)
        wants = getattr(DECODERS.get(d.decoder), "tokenizers", None)
        if wants:
            from unipred.task.base import model_tokenizer

            tok = model_tokenizer(cfg)[0]
            if tok not in wants:
                raise ValueError(f"data.decoder={d.decoder} needs the {' or '.join(wants)} "
                                 f"tokenizer, not {tok!r}; use data.decoder=linear")  # fmt: skip
        super().check_config(cfg)

    @classmethod
    def check_run(cls, cfg) -> None:
        super().check_run(cfg)
        n = cfg.data.num_classes
        if n and cls.data_class is not None:
            have = cls.data_class(cfg, cls.objective).num_classes()
            if have and n < have:
                raise ValueError(f"data.num_classes={n} but the data have {have} classes: "
                                 f"set data.num_classes={have} (or 0: from the data)")  # fmt: skip

    def num_classes(self) -> int:
        n = self.cfg.data.num_classes or (self.source.num_classes() if self.source else None)
        if not n:
            from unipred.train.config import ConfigError

            raise ConfigError(f"task {self.cfg.task!r} does not know its number of classes: "
                              "set data.num_classes")  # fmt: skip
        return int(n)

    def build_dataset(self, split):
        if split == "train" and self.cfg.data.mode == "eval":
            return None
        return super().build_dataset(split)

    def build_model(self) -> nn.Module:
        model = DECODERS.get(self.cfg.data.decoder)(
            self.model_config(head="none"), self.num_classes(), self
        )
        if self.cfg.data.mode == "probe":  # the decoder alone trains
            for name, p in model.named_parameters():
                if not name.startswith("head."):
                    p.requires_grad_(False)
        return model

    def build_metrics(self) -> dict[str, Any]:
        from unipred.task.seg_metrics import MeanAccuracy, MeanIoU, PixelAccuracy

        n, ign = self.num_classes(), self.cfg.data.ignore_index
        return {"mIoU": MeanIoU(n, ign), "mAcc": MeanAccuracy(n, ign), "aAcc": PixelAccuracy(n, ign)}  # fmt: skip

    def training_step(self, model, batch):
        x, y = batch[0], batch[1]
        if self.cfg.data.mode == "probe":  # frozen backbone: eval mode (no drop path)
            model.tokenizer.eval()
            model.predictor.eval()
        out = model(x)
        if not self._labels_checked:
            check_labels(y, out.logits.shape[1], self.cfg.data.ignore_index)
            self._labels_checked = True
        loss, logs = segment_loss(out, y, self.cfg.data.ignore_index)
        logs["loss"] = loss.detach()
        if self.source is not None:
            logs.update(self.source.step_logs())
        return loss, logs

    def validation_step(self, model, batch, metrics):
        """Per batch, or per sample when the batch is a list of differently sized samples."""
        x, y = batch[0], batch[1]
        was_training = model.training
        model.eval()  # the EMA copy is not switched by Lightning
        if isinstance(x, (list, tuple)):  # each sample at its own size: a batch of one
            pairs = [(xi[None], yi[None]) for xi, yi in zip(x, y)]
        else:
            pairs = [(x, y)]
        device = next(model.parameters()).device
        for xi, yi in pairs:
            yi = yi.to(device)
            pred = model.predict(xi, yi.shape[1:]).argmax(dim=1)
            for m in metrics.values():
                m.update(pred, yi)
        model.train(was_training)
        return {}

    def batch_size(self, batch) -> int:
        x = batch[0]  # a list of differently sized samples, or what Task.batch_size reads
        return len(x) if isinstance(x, (list, tuple)) else super().batch_size(batch)
