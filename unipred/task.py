"""The Task contract: what a task file in tasks/ provides so the one engine can run it.

A task is a class registered in ``unipred.registry.TASKS``. It names a data-config dataclass
(``data_config``), builds its model and datasets, and computes the loss and metrics of one
batch. The engine (unipred/engine.py) owns everything else: optimizer, schedule, precision,
EMA, checkpoints, distributed, logging. Tasks never import Lightning.

Writing a task (see tasks/image/debug.py for a complete example)::

    @dataclass
    class MyData(DataConfig):            # becomes the typed ``data:`` section of the YAML
        image_size: int = 224

    @TASKS.register("my_pretrain")
    class MyPretrain(PretrainTask):      # or ClassifyTask (with ClassifyData), or Task
        data_config = MyData
        def build_dataset(self, split):  # "train" | "val"; map-style or IterableDataset | None
            ...                          # self.cfg is the whole run config (cfg.data: MyData)
        @classmethod
        def smoke_config(cls):           # tiny CPU run used by tests/test_tasks_smoke.py
            return {"model.name": "nepa_debug", "data.image_size": 32, "trainer.global_batch": 4}

* ``data.root == ""`` must mean generated/demo data, so the smoke test runs anywhere.
* Data fields named ``*root``, ``*path``, ``*file``, ``*manifest`` or ``*csv`` are inputs: when
  set to a local path that does not exist, the config fails before any model is built. Name
  caches and outputs otherwise (``cache_dir``).
* Datasets are sharded by the engine: map-style sets get a seeded per-epoch permutation split
  over the ranks (do not add a sampler). An ``IterableDataset`` shards itself (by rank and
  worker) and, for exact resumption, implements ``set_epoch(epoch)`` and ``resume(n)``: skip
  the first n samples this rank delivered in that epoch (whole shards first), with shard order
  a function of (seed, epoch) only; see unipred/loader.py.
* The model: ``self.model_config(**defaults)`` turns ``cfg.model`` (size + overrides) into a
  core ModelConfig; ``PretrainTask``/``ClassifyTask`` already implement ``build_model``.
* Metrics are torchmetrics objects keyed by short names ("acc1"); the engine logs them as
  ``val/acc1`` (raw weights) and ``val_ema/acc1`` (EMA weights). ``monitor`` names the metric
  that selects the best checkpoint ("val/acc1"; the engine swaps in ``val_ema/`` when
  ``ema.monitor_ema``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class DataConfig:
    """Fields every task's data section has; tasks subclass it and add their own."""

    root: str = ""  # training data: a folder, a shard pattern ("/d/train-{000000..000127}.tar"),
    #                 a "pipe:" command or a URL; "" means the task's generated/demo data
    val_root: str = ""  # validation data, same forms; "" disables validation
    num_workers: int = 4
    shuffle_buffer: int = 5000  # streaming (webdataset) shuffle buffer


class Task:
    """Base class. Subclasses set ``name`` (via the registry) and ``data_config``."""

    data_config: ClassVar[type[DataConfig]] = DataConfig
    # the metric the engine monitors for "best" checkpoints, and its mode
    monitor: ClassVar[str | None] = None
    monitor_mode: ClassVar[str] = "max"

    def __init__(self, cfg: Any):
        self.cfg = cfg  # the full, validated run config (cfg.model, cfg.data, cfg.optim, ...)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Catch shape mistakes before anything is built (``unipred.config.load_config`` calls
        it, also under ``--print-config``): patch vs input size, channels vs the data, the
        tokenizer vs the task, classes vs the labels found. Raise ``ValueError`` with one line
        naming the keys; peek at data on disk only where the path exists. Default: no check."""

    # -- building ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_dataset(self, split: str) -> torch.utils.data.Dataset | None:
        """split in {"train", "val"}; map-style or IterableDataset; None if the split is absent."""
        raise NotImplementedError

    def collate_fn(self, split: str):
        """Optional batch collation (e.g. Mixup/CutMix, padding); None = default collate."""
        return None

    def feature_dataset(self, split: str):
        """``(dataset, collate_fn)`` of ``split`` as the frozen-feature protocols read it (kNN,
        probes; unipred/protocols.py): labelled, with evaluation-time processing (no
        augmentation, one pass). The default is ``build_dataset(split)`` with the val collate;
        a task whose training split augments inside its dataset overrides this."""
        return self.build_dataset(split), self.collate_fn("val")

    def build_metrics(self) -> dict[str, Any]:
        """torchmetrics objects updated by ``validation_step``; the engine logs and resets them."""
        return {}

    # -- per batch --------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
        """-> (loss, {name: scalar tensor to log}). Must not call backward."""
        raise NotImplementedError

    def validation_step(self, model: nn.Module, batch: Any, metrics: dict[str, Any]) -> dict:
        """Update ``metrics`` in place; return extra scalars to log (averaged over batches)."""
        return {}

    def batch_size(self, batch: Any) -> int:
        """Number of samples in a batch (for throughput and logging)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(x, dict):
            x = next(iter(x.values()))
        return int(x.shape[0])

    # -- testing ----------------------------------------------------------------------------
    @classmethod
    def smoke_config(cls) -> dict[str, Any]:
        """Dotted-key overrides that make a tiny CPU run of this task (a few seconds).

        ``tests/test_tasks_smoke.py`` runs every registered task with these overrides on top of
        its own (cpu, fp32, 2 train + 1 val batch, no logs). The run must work without any
        dataset on disk: keep ``data.root`` "" and generate data when it is empty. Example::

            return {"model.name": "nepa_debug", "data.image_size": 32, "trainer.global_batch": 4}
        """
        return {"model.name": "nepa_debug", "trainer.global_batch": 4}

    # -- helpers for subclasses -------------------------------------------------------------
    def model_config(self, **defaults):
        """The ModelConfig of ``cfg.model``; ``defaults`` (e.g. head="mean", num_classes=10)
        fill in what the config leaves unset (None)."""
        from unipred.config import build_model_config

        return build_model_config(self.cfg.model, **defaults)

    def inputs(self, batch: Any) -> Any:
        """The model input of a batch: the first element of a tuple/list, else the batch."""
        return batch[0] if isinstance(batch, (list, tuple)) else batch


# ------------------------------------------------------------- config-time shape checks
# helpers for Task.check_config: each raises one ValueError line naming the keys to change
def model_tokenizer(cfg) -> tuple[str, dict]:
    """(tokenizer name, tokenizer args) of the config's model (size + overrides)."""
    from unipred.config import build_model_config

    try:
        mc = build_model_config(cfg.model)
    except KeyError as e:
        raise ValueError(f"model.name: {e.args[0]}") from None
    except TypeError as e:
        raise ValueError(f"model: {e}") from None
    return mc.tokenizer, dict(mc.tokenizer_args)


def check_tokenizer(tokenizer: str, want: str, model_name: str, judged=()) -> None:
    """The model's tokenizer vs the one the task reads (tokenizers outside ``judged``, e.g. a
    plugin's, are not judged)."""
    if tokenizer in judged and tokenizer != want:
        raise ValueError(
            f"model.name={model_name!r} uses the {tokenizer!r} tokenizer but this task reads "
            f"{want} data; pick an {want} model (`unipred list`) or set model.tokenizer={want}"
        )


def check_patch(size: int, patch, size_key: str) -> None:
    """``size`` must be a multiple of the (square) patch size."""
    p = patch if isinstance(patch, int) else patch[0]
    if size < p or size % p:
        fits = [str(q) for q in range(2, min(size, 16) + 1) if size % q == 0]
        patches = f"a patch of {', '.join(fits[:-1])} or {fits[-1]}, or " if len(fits) > 1 else ""
        near = sorted({max(p, size // p * p), (size // p + 1) * p})
        raise ValueError(
            f"{size_key}={size} is not a multiple of the patch size {p} "
            f"(model.tokenizer_args.patch_size): use {patches}a size of "
            f"{' or '.join(map(str, near))}"
        )


# ----------------------------------------------------------------------------------- bases
def collapse_stats(x: torch.Tensor, valid: torch.Tensor | None = None, max_rows: int = 4096):
    """Collapse indicators of embeddings x (..., D): per-dimension std (mean and min over
    dimensions), the effective rank exp(H(singular values / sum)) of the centred rows, and
    ``spread`` = sqrt(total variance / mean squared norm): the fraction of the rows' size that
    differs between rows, 1 for zero-mean rows, 0 when every row is the same vector. Unlike the
    std it does not depend on the scale, and unlike the effective rank it sees rows that
    shrink towards one vector (the residual differences can stay isotropic)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if valid is not None:
        x = x[valid.reshape(-1).bool()]
    if x.shape[0] > max_rows:  # a fixed stride keeps it cheap and deterministic
        x = x[:: x.shape[0] // max_rows + 1]
    std = x.std(dim=0) if x.shape[0] > 1 else torch.zeros(x.shape[-1], device=x.device)
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    p = s / s.sum().clamp_min(1e-12)
    erank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    spread = (std.pow(2).sum() / x.pow(2).sum(-1).mean().clamp_min(1e-24)).sqrt()
    return {"std_mean": std.mean(), "std_min": std.min(), "erank": erank, "spread": spread}


class PretrainTask(Task):
    """Next-embedding pretraining: loss = model(x).loss, validation loss, collapse statistics.

    Subclasses provide ``data_config`` and ``build_dataset`` (and ``collate_fn`` if needed).
    The engine sets ``self.want_stats = True`` on the steps where it wants collapse statistics.
    """

    want_stats: bool = False

    def build_model(self) -> nn.Module:
        from unipred.model import NEPA

        return NEPA(self.model_config(head="none"))

    def training_step(self, model, batch):
        out = model(self.inputs(batch))
        logs = {"loss": out.loss.detach()}
        if self.want_stats:
            stats = collapse_stats(out.predictions, out.valid)
            logs.update({f"collapse/{k}": v for k, v in stats.items()})
            # the targets: without stop-gradient these are what collapses first
            stats = collapse_stats(out.targets, out.valid)
            logs.update({f"collapse/target_{k}": v for k, v in stats.items()})
        return out.loss, logs

    def validation_step(self, model, batch, metrics):
        return {"loss": model(self.inputs(batch)).loss}


@dataclass
class ClassifyData(DataConfig):
    num_classes: int = 0  # 0 = the task's default
    label_smoothing: float = 0.0  # for hard labels; Mixup applies its own to soft labels
    # label budgets: the subset depends on subset_seed and the data only, never on the run
    # seed, so NEPA and scratch runs of a comparison see the same images
    labels_per_class: int = 0  # keep this many training samples per class (0 = all)
    subset_seed: int = 0  # picks the labels_per_class subset
    repeat: int = 1  # one training epoch = this many passes over the (sub)set, freshly augmented


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


class ClassifyTask(Task):
    """Classification: batches are (x, y) with y class indices (B,) or soft targets (B, C).

    Soft targets (Mixup/CutMix) use soft cross-entropy in fp32; hard labels use cross-entropy
    with ``data.label_smoothing``. Metrics: top-1 and top-5 accuracy (torchmetrics).
    """

    data_config: ClassVar[type[DataConfig]] = ClassifyData
    monitor: ClassVar[str | None] = "val/acc1"
    monitor_mode: ClassVar[str] = "max"
    default_num_classes: ClassVar[int] = 0  # 0 = none: the config must give the class count
    default_head: ClassVar[str] = "mean"

    def num_classes(self) -> int:
        """``data.num_classes``, else ``model.num_classes``, else ``default_num_classes``;
        override it to derive the count from the data."""
        n = getattr(self.cfg.data, "num_classes", 0) or self.cfg.model.num_classes
        n = int(n or self.default_num_classes)
        if n < 1:
            from unipred.config import ConfigError

            raise ConfigError(
                f"task {self.cfg.task!r} does not know its number of classes: set "
                f"data.num_classes (or give {type(self).__name__} a default_num_classes or a "
                f"num_classes() method)"
            )
        return n

    @classmethod
    def check_config(cls, cfg) -> None:
        k = getattr(cfg.data, "labels_per_class", 0)
        if k < 0:
            raise ValueError(f"data.labels_per_class={k} must be >= 0 (0 = every label)")
        if getattr(cfg.data, "repeat", 1) < 1:
            raise ValueError(f"data.repeat={cfg.data.repeat} must be >= 1")

    def label_budget(self, ds, split: str, repeat: bool = True):
        """The training set cut to ``data.labels_per_class`` samples per class (seeded by
        ``data.subset_seed`` alone) and repeated ``data.repeat`` times per epoch (not with
        ``repeat=False``: the frozen-feature protocols read each sample once); other splits,
        and a budget of 0 with repeat 1, pass through unchanged."""
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

    def build_model(self) -> nn.Module:
        from unipred.model import NEPA

        return NEPA(self.model_config(head=self.default_head, num_classes=self.num_classes()))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.is_floating_point() and target.dim() == 2:
            return torch.sum(-target.float() * logits.log_softmax(dim=-1), dim=-1).mean()
        ls = float(getattr(self.cfg.data, "label_smoothing", 0.0))
        return nn.functional.cross_entropy(logits, target, label_smoothing=ls)

    def training_step(self, model, batch):
        x, y = batch[0], batch[1]
        loss = self.loss(model(x).logits, y)
        return loss, {"loss": loss.detach()}

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
