"""``ClassifyTask``: fine-tuning, linear probe (features cached per sample) and evaluation on
any labelled data source (``data.mode``), with label budgets (``data.per_class``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from unipred.task.base import DataConfig, Task

MODES = ("finetune", "probe", "eval")


@dataclass
class ClassifyData(DataConfig):
    num_classes: int = 0  # 0 = model.num_classes, else what the data define (DataSource)
    # finetune: the whole model trains | probe: linear probe of the frozen backbone (eval mode,
    # BatchNorm + linear on pooled final-norm features) | eval: validation only (unipred eval)
    mode: str = "finetune"
    # probe: read the training split without augmentation and compute each frozen feature once
    # (later epochs train the linear layer alone); false = the training augmentation runs and
    # the features are recomputed every step
    cache_features: bool = True
    label_smoothing: float = 0.0  # for hard labels; Mixup applies its own to soft labels
    # label budgets: the subset depends on subset_seed and the data only, never on the run
    # seed, so NEPA and scratch runs of a comparison see the same images
    labels_per_class: int = 0  # keep this many training samples per class (0 = all)
    subset_seed: int = 0  # picks the labels_per_class subset
    # one training epoch = this many passes over the (sub)set, freshly augmented (one pass
    # where the data are read unaugmented: cached probe features, unipred eval protocols)
    repeat: int = 1


def per_class_indices(labels, k: int, seed: int, what: str = "data") -> list[int]:
    """Sorted indices of ``k`` samples of every class in ``labels`` (ints), chosen by ``seed``
    alone; ValueError naming the class if one has fewer than ``k``."""
    y = torch.as_tensor([int(v) for v in labels], dtype=torch.long)
    g = torch.Generator().manual_seed(seed + 1)
    keep = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        if len(idx) < k:
            raise ValueError(
                f"data.labels_per_class={k}: class {c} of {what} has only {len(idx)} "
                "training samples"
            )
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(keep).sort().values.tolist() if keep else []


def dataset_labels(ds) -> list[int]:
    """The label of every sample of a map-style dataset: from ``samples`` / ``items``
    ((x, label) pairs), ``labels`` / ``targets``, else by reading each item (generated sets)."""
    for attr in ("samples", "items"):
        rows = getattr(ds, attr, None)
        if isinstance(rows, list) and rows and isinstance(rows[0], (tuple, list)):
            return [int(r[1]) for r in rows]
    for attr in ("labels", "targets"):
        v = getattr(ds, attr, None)
        if v is not None and len(v) == len(ds):
            return [int(t) for t in v]
    return [int(ds[i][1]) for i in range(len(ds))]


class Indexed(torch.utils.data.Dataset):
    """Items ``(*item, key)``: ``key`` names the underlying sample (through Subsets), so a
    feature cache computes each sample's frozen feature once, however often it repeats."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def key(self, i: int) -> int:
        ds = self.ds
        while isinstance(ds, torch.utils.data.Subset):
            i, ds = ds.indices[i], ds.dataset
        return int(i)

    def __getitem__(self, i: int):
        item = self.ds[i]
        item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        return (*item, self.key(i))


class IndexedCollate:
    """Collates the items with ``collate`` (None: torch's default), keys appended as a tensor."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        from torch.utils.data import default_collate

        batch = (self.collate or default_collate)([it[:-1] for it in items])
        keys = torch.tensor([it[-1] for it in items], dtype=torch.long)
        return (*batch, keys) if isinstance(batch, (tuple, list)) else (batch, keys)


class ClassifyTask(Task):
    """Classification (``data.mode``): fine-tuning, linear probe or evaluation.

    Batches are (x, y, ...) with y class indices (B,) or soft targets (B, C). Soft targets
    (Mixup/CutMix) use soft cross-entropy in fp32; hard labels use cross-entropy with
    ``data.label_smoothing``. Metrics: top-1 and top-5 accuracy (torchmetrics).

    The linear probe (MAE's protocol; ``data.mode=probe``) trains the model's "probe" head
    (BatchNorm without affine + linear) on pooled features of the frozen backbone, which runs
    in eval mode under no grad (unipred.protocols.frozen_features, the features of
    ``unipred eval protocol=linear``); with ``data.cache_features`` each training feature is
    computed once (unipred.protocols.FeatureCache).
    """

    objective: ClassVar[str] = "classify"
    summary: ClassVar[str] = "Classification (data.mode: finetune | probe | eval)"
    data_config: ClassVar[type[DataConfig]] = ClassifyData
    monitor: ClassVar[str | None] = "val/acc1"
    monitor_mode: ClassVar[str] = "max"
    default_num_classes: ClassVar[int] = 0  # 0 = none: the config or the data must give it
    default_head: ClassVar[str] = "mean"

    def __init__(self, cfg):
        super().__init__(cfg)
        mode = getattr(cfg.data, "mode", "finetune")
        if mode not in MODES:
            raise ValueError(f"data.mode={mode!r}; use one of {list(MODES)}")
        self._cache = None
        self._streamed = False  # the cached probe's training set is an IterableDataset

    @property
    def mode(self) -> str:
        """``data.mode``; ``model.head=probe`` alone also means the linear probe."""
        mode = getattr(self.cfg.data, "mode", "finetune")
        return "probe" if mode == "finetune" and self.cfg.model.head == "probe" else mode

    def num_classes(self) -> int:
        """The class count, decided in one place: ``data.num_classes``, else
        ``model.num_classes``, else what the data source reports, else
        ``default_num_classes``; ConfigError when none knows."""
        n = getattr(self.cfg.data, "num_classes", 0) or self.cfg.model.num_classes
        if not n and self.source is not None:
            n = self.source.num_classes()
        n = int(n or self.default_num_classes)
        if n < 1:
            from unipred.train.config import ConfigError

            raise ConfigError(
                f"task {self.cfg.task!r} does not know its number of classes: set "
                "data.num_classes (or have the data source's num_classes() report it)"
            )
        return n

    @classmethod
    def check_config(cls, cfg) -> None:
        k = getattr(cfg.data, "labels_per_class", 0)
        if k < 0:
            raise ValueError(f"data.labels_per_class={k} must be >= 0 (0 = every label)")
        if getattr(cfg.data, "repeat", 1) < 1:
            raise ValueError(f"data.repeat={cfg.data.repeat} must be >= 1")
        mode = getattr(cfg.data, "mode", "finetune")
        if mode not in MODES:
            raise ValueError(f"data.mode={mode!r}; use one of {list(MODES)}")
        if mode == "probe" and cfg.model.head not in (None, "probe"):
            raise ValueError(f"data.mode=probe trains the probe head: model.head="
                             f"{cfg.model.head!r} must be unset or 'probe'")  # fmt: skip
        cls.resolve_classes(cfg)
        super().check_config(cfg)

    @classmethod
    def resolve_classes(cls, cfg) -> None:
        """The class count, decided once (unipred/train/classes.py): the config, else the
        training data, else the checkpoint whose classifier is used, else what the data source
        knows without training data (a val folder, generated data); conflicts are one line."""
        from unipred.train.classes import resolve_classes

        source = cls.data_class(cfg, cls.objective) if cls.data_class is not None else None
        counts = source.num_classes if source is not None else (lambda: None)
        resolve_classes(cfg, counts if getattr(cfg.data, "root", "") else (lambda: None))
        if not cfg.data.num_classes and source is not None:
            n = counts()
            if n:
                cfg.data.num_classes = n
                from unipred.train.provenance import set_source

                set_source(cfg, "data.num_classes", "data source (no training data named)")

    def label_budget(self, ds, split: str, repeat: bool = True):
        """The training set cut to ``data.labels_per_class`` samples per class (seeded by
        ``data.subset_seed`` alone) and, with ``repeat``, repeated ``data.repeat`` times per
        epoch; other splits, and a budget of 0 with repeat 1, pass through unchanged."""
        k, rep = getattr(self.cfg.data, "labels_per_class", 0), getattr(self.cfg.data, "repeat", 1)
        rep = rep if repeat else 1
        if ds is None or split != "train" or (k <= 0 and rep <= 1):
            return ds
        if isinstance(ds, torch.utils.data.IterableDataset):
            raise ValueError(
                f"data.labels_per_class={k} / data.repeat={rep} need a map-style training set "
                f"(a folder or a CSV); {self.cfg.data.root!r} is streamed: pack the subset instead"
            )
        idx = list(range(len(ds)))
        if k > 0:
            what = self.cfg.data.root or "the generated data"
            idx = per_class_indices(dataset_labels(ds), k, self.cfg.data.subset_seed, what)
            logging.getLogger(__name__).info(
                "data.labels_per_class=%d: %d of %d training samples", k, len(idx), len(ds)
            )
        sub = torch.utils.data.Subset(ds, idx * max(rep, 1))
        if hasattr(ds, "classes"):  # what callers read from the full set stays readable
            sub.classes = ds.classes
        return sub

    # -- data ---------------------------------------------------------------------------------
    def _cached_probe(self, split: str) -> bool:
        return self.mode == "probe" and split == "train" and self.cfg.data.cache_features

    def build_dataset(self, split):
        if split == "train" and self.mode == "eval":
            return None
        if self.source is None:
            raise NotImplementedError
        augment = split == "train" and not self._cached_probe(split)
        ds = self.source.build(split, augment=augment)
        if not self.source.applies_label_budget:  # repeats are fresh augmentations only
            ds = self.label_budget(ds, split, repeat=augment)
        if ds is not None and self._cached_probe(split):
            self._streamed = isinstance(ds, torch.utils.data.IterableDataset)
            if self._streamed:  # no sample index to key a cache on: features recomputed
                logging.getLogger(__name__).info(
                    "data.cache_features: %r is streamed; frozen features are recomputed every "
                    "step (un-augmented)",
                    self.cfg.data.root,
                )
            else:
                ds = Indexed(ds)
        return ds

    def feature_dataset(self, split):
        """The split as the frozen-feature protocols read it: unaugmented, one pass, with the
        config's label subset (``data.labels_per_class``)."""
        if self.source is None:
            return super().feature_dataset(split)
        ds = self.source.build(split, augment=False)
        if not self.source.applies_label_budget:
            ds = self.label_budget(ds, split, repeat=False)
        return ds, self.source.collate(split, False)

    def collate_fn(self, split):
        if self.source is None:
            return None
        train = split == "train"
        finetune = train and self.mode == "finetune"
        augment = train and not self._cached_probe(split)
        fn = self.source.collate(split, augment, self.num_classes() if finetune else None)
        return IndexedCollate(fn) if self._cached_probe(split) and not self._streamed else fn

    # -- model --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from unipred.nn.model import NEPA

        head = "probe" if self.mode == "probe" else self.default_head
        model = NEPA(self.model_config(head=head, num_classes=self.num_classes()))
        if self.mode == "probe":
            # the probe trains the head only; everything before it is the frozen backbone
            for name, p in model.named_parameters():
                if not name.startswith("head."):
                    p.requires_grad_(False)
        return model

    def probe_features(self, model, x, keys=None) -> torch.Tensor:
        """Pooled frozen features (B, D) in fp32; cached per sample when ``keys`` is given."""
        from unipred.nn.features import FeatureCache, frozen_features

        if keys is None:
            return frozen_features(model, x)
        if self._cache is None:
            self._cache = FeatureCache()
        return self._cache.get(keys, lambda: frozen_features(model, x))

    def probe_logits(self, model, x, keys=None) -> torch.Tensor:
        """The probe head's logits on frozen features (backbone in eval mode, no grad)."""
        f = self.probe_features(model, x, keys)
        return model.head.classifier(model.head.bn(f.to(model.head.classifier.weight.dtype)))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.is_floating_point() and target.dim() == 2:
            return torch.sum(-target.float() * logits.log_softmax(dim=-1), dim=-1).mean()
        ls = float(getattr(self.cfg.data, "label_smoothing", 0.0))
        return nn.functional.cross_entropy(logits, target, label_smoothing=ls)

    def training_step(self, model, batch):
        x, y = batch[0], batch[1]
        if self.mode == "probe":
            keys = batch[2] if self._cached_probe("train") and len(batch) > 2 else None
            logits = self.probe_logits(model, x, keys)
        else:
            logits = model(x).logits
        loss = self.loss(logits, y)
        logs = {"loss": loss.detach()}
        if self.source is not None:
            logs.update(self.source.step_logs())
        return loss, logs

    def build_metrics(self) -> dict[str, Any]:
        from torchmetrics.classification import MulticlassAccuracy

        n = self.num_classes()
        return {
            "acc1": MulticlassAccuracy(num_classes=n, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(num_classes=n, top_k=min(5, n), average="micro"),
        }

    def validation_step(self, model, batch, metrics):
        x, y = batch[0], batch[1]
        logits = model(x).logits.float()
        hard = y.argmax(dim=-1) if y.is_floating_point() and y.dim() == 2 else y
        for m in metrics.values():
            m.update(logits, hard)
        return {"loss": nn.functional.cross_entropy(logits, hard)}
