"""Objectives and data: what the one engine runs.

A **task** is an objective on a data set. The objectives are written once, here, for any
tokenizer: ``PretrainTask`` (next-embedding pretraining) and ``ClassifyTask`` (fine-tuning,
linear probe, evaluation; ``data.mode``). A modality supplies **data sources**: a subclass of
``DataSource`` (its ``data:`` config section, ``build`` for a split, ``collate``, the class count
it knows, a synthetic fallback when ``data.root`` is empty) registered with
``register_data("name")``, which registers the tasks ``name_pretrain`` and ``name_classify``::

    @dataclass
    class MyData(DataConfig):            # becomes the typed ``data:`` section of the YAML
        length: int = 64

    @register_data("waves")              # -> tasks waves_pretrain, waves_classify
    class Waves(DataSource):
        config = MyData
        smoke = {"model.name": "nepa_toy", "trainer.global_batch": 4}
        def build(self, split, augment):  # "train" | "val"; (input, label) items; None = absent
            ...                           # self.cfg is the whole run config (cfg.data: MyData)
        def num_classes(self):            # what the data say, when the config does not
            return 10

The engine (unipred/engine.py) owns everything else: optimizer, schedule, precision, EMA,
checkpoints, distributed, logging. Objectives that need a model of their own (UperNet
segmentation) subclass ``Task`` directly. docs/adding-a-modality.md is the full guide.

* ``data.root == ""`` must mean generated/demo data, so the smoke test runs anywhere.
* Data fields named ``*root``, ``*path``, ``*file``, ``*manifest`` or ``*csv`` are inputs: when
  set to a local path that does not exist, the config fails before any model is built. Name
  caches and outputs otherwise (``cache_dir``).
* Datasets are sharded by the engine: map-style sets get a seeded per-epoch permutation split
  over the ranks (do not add a sampler). An ``IterableDataset`` shards itself (by rank and
  worker) and, for exact resumption, implements ``set_epoch(epoch)`` and ``resume(n)``: skip
  the first n samples this rank delivered in that epoch (whole shards first), with shard order
  a function of (seed, epoch) only; see unipred/loader.py.
* Metrics are torchmetrics objects keyed by short names ("acc1"); the engine logs them as
  ``val/acc1`` (raw weights) and ``val_ema/acc1`` (EMA weights). ``monitor`` names the metric
  that selects the best checkpoint ("val/acc1"; the engine swaps in ``val_ema/`` when
  ``ema.monitor_ema``).
"""

from __future__ import annotations

import dataclasses
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
    # unreadable training samples are skipped and counted; more than this fraction of an
    # epoch's samples stops the run (one line naming the folder); 1 = never stop
    max_bad_fraction: float = 0.05
    follow_symlinks: bool = False  # also follow symlinks leading out of a data folder


class DataSource:
    """One data set of a modality, as every objective reads it.

    Subclasses set ``config`` (a ``DataConfig`` dataclass: the ``data:`` section) and implement
    ``build``; the rest is optional. Register with ``@register_data("name")``. An instance is
    made per task with the whole run config (``self.cfg``; ``self.cfg.data`` is ``config``) and
    the objective's name (``self.objective``: "pretrain", "classify", ...).
    """

    config: ClassVar[type[DataConfig]] = DataConfig
    # dotted-key overrides for a tiny CPU run without data on disk (tests/test_tasks_smoke.py)
    smoke: ClassVar[dict[str, Any]] = {"model.name": "nepa_debug", "trainer.global_batch": 4}
    # the builder cuts the training set to data.labels_per_class and repeats it data.repeat
    # times when augmenting (one pass when not) itself
    applies_label_budget: ClassVar[bool] = False
    # segmentation (unipred.segment): the tokenizer coordinate axes the dense label maps span,
    # in the labels' order; None = every axis (an image's (y, x), a video's (t, y, x)); an
    # audio spectrogram's per-frame labels span (0,): time, the frequency bands averaged
    label_axes: ClassVar[tuple[int, ...] | None] = None
    # filled by register_data: objective name -> the registered task class
    tasks: ClassVar[dict[str, type]] = {}

    def __init__(self, cfg: Any, objective: str = "pretrain"):
        self.cfg, self.objective = cfg, objective

    def build(self, split: str, augment: bool) -> torch.utils.data.Dataset | None:
        """The dataset of ``split`` ("train" | "val"), None when absent. Items are
        ``(input, label, ...)`` or the input alone (pretraining only). ``augment``: the
        training pipeline (random crops, noise...) or the evaluation one (deterministic; what
        a frozen-feature probe reads). ``data.root == ""`` must generate data."""
        raise NotImplementedError

    def collate(self, split: str, augment: bool, num_classes: int | None = None):
        """Batch collation (padding, batch-level augmentation) or None for torch's default.
        ``num_classes`` is the classifier's class count when fine-tuning (for label mixing
        such as Mixup), else None."""
        return None

    def num_classes(self) -> int | None:
        """The class count the data define (a folder's classes, a generated set's), used when
        neither ``data.num_classes`` nor ``model.num_classes`` is set; None = unknown."""
        return None

    @classmethod
    def check_config(cls, cfg: Any, objective: str) -> None:
        """Catch shape mistakes before anything is built (``unipred.config.load_config`` calls
        it, also under ``--print-config``): patch vs input size, channels, the tokenizer.
        Raise ``ValueError`` with one line naming the keys. Default: no check."""

    @classmethod
    def check_run(cls, cfg: Any, objective: str) -> None:
        """What only a run needs, checked when a config is loaded for a run (not for
        ``--help`` / ``--print-config``), e.g. a value to be read from data that is not named.
        Raise ``ValueError`` with one line. Default: no check."""

    @classmethod
    def smoke_config(cls, objective: str) -> dict[str, Any]:
        return dict(cls.smoke)

    def adapt_model(self, mc):
        """The core ModelConfig adjusted to the data (e.g. the tokenizer's channel count or
        sample rate taken from the data set); raise ValueError on a conflicting setting."""
        return mc

    def step_logs(self) -> dict[str, torch.Tensor]:
        """Extra scalars logged with every training step (e.g. bad-sample counts)."""
        return {}

    def baseline_scores(self, train: list, test: list) -> dict[str, float]:
        """Modality-specific baselines that every evaluation of this data prints beside the
        backbone (``unipred eval protocol=...``, ``evaluate-suite``, ``unipred compare``):
        ``{name: top-1 accuracy as a fraction}``, e.g. a character n-gram classifier for text.
        ``train`` / ``test`` are lists of ``(input, label)`` items as ``build(split,
        augment=False)`` returns them, the training list cut to the run's label budget
        (``data.labels_per_class``). Default: none ({}); the core adds the random-init backbone
        and k-NN / linear on the tokenizer's raw patches for every source itself."""
        return {}


class Task:
    """Base class of objectives. A task is an objective class bound to a ``DataSource``
    (``data_class``) by ``register_data``; objectives that read data their own way override
    ``build_dataset`` (and set ``data_config``) instead."""

    data_config: ClassVar[type[DataConfig]] = DataConfig
    data_class: ClassVar[type[DataSource] | None] = None
    objective: ClassVar[str] = "task"
    summary: ClassVar[str] = "A task"  # `unipred list` shows "<summary> on the 'x' data source."
    # the metric the engine monitors for "best" checkpoints, and its mode
    monitor: ClassVar[str | None] = None
    monitor_mode: ClassVar[str] = "max"

    def __init__(self, cfg: Any):
        self.cfg = cfg  # the full, validated run config (cfg.model, cfg.data, cfg.optim, ...)
        self.source = self.data_class(cfg, self.objective) if self.data_class else None

    @classmethod
    def on(cls, source: type[DataSource], name: str, data: str) -> type[Task]:
        """This objective on ``source`` (registered as ``data``): the task class ``name``."""
        camel = "".join(w[:1].upper() + w[1:] for w in name.split("_"))
        attrs = {"data_class": source, "data_config": cls.config_for(source.config),
                 "__module__": source.__module__,
                 "__doc__": f"{cls.summary} on the {data!r} data source."}  # fmt: skip
        return type(camel, (cls,), attrs)

    @classmethod
    def config_for(cls, data_config: type[DataConfig]) -> type[DataConfig]:
        """The data section of this objective on a source with ``data_config``: the source's
        fields plus the objective's own (``data_config`` of the objective class, e.g.
        ``ClassifyData``), unless the source's config already subclasses them."""
        own = cls.data_config
        if own is DataConfig or issubclass(data_config, own):
            return data_config
        name = data_config.__name__.removesuffix("Data").removesuffix("Config")
        return dataclasses.make_dataclass(f"{name}{own.__name__}", [], bases=(data_config, own))

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Catch shape mistakes before anything is built (``unipred.config.load_config`` calls
        it, also under ``--print-config``). Raise ``ValueError`` with one line naming the keys.
        Default: the data source's checks."""
        if cls.data_class is not None:
            cls.data_class.check_config(cfg, cls.objective)

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        """Checks only a run needs (``load_config`` for a run; not under ``--help`` or
        ``--print-config``). Default: the data source's ``check_run``."""
        if cls.data_class is not None:
            cls.data_class.check_run(cfg, cls.objective)

    # -- building ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_dataset(self, split: str) -> torch.utils.data.Dataset | None:
        """split in {"train", "val"}; map-style or IterableDataset; None if the split is absent."""
        if self.source is None:
            raise NotImplementedError
        return self.source.build(split, augment=split == "train")

    def collate_fn(self, split: str):
        """Optional batch collation (e.g. Mixup/CutMix, padding); None = default collate."""
        if self.source is None:
            return None
        return self.source.collate(split, augment=split == "train")

    def feature_dataset(self, split: str):
        """``(dataset, collate_fn)`` of ``split`` as the frozen-feature protocols read it (kNN,
        probes; unipred/protocols.py): labelled, with evaluation-time processing (no
        augmentation, one pass)."""
        if self.source is not None:
            return self.source.build(split, augment=False), self.source.collate(split, False)
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
        dataset on disk: keep ``data.root`` "" and generate data when it is empty. Default: the
        data source's ``smoke_config``."""
        if cls.data_class is not None:
            return cls.data_class.smoke_config(cls.objective)
        return {"model.name": "nepa_debug", "trainer.global_batch": 4}

    # -- helpers for subclasses -------------------------------------------------------------
    def model_config(self, **defaults):
        """The ModelConfig of ``cfg.model``; ``defaults`` (e.g. head="mean", num_classes=10)
        fill in what the config leaves unset (None); the data source adapts it."""
        from unipred.train.config import build_model_config

        mc = build_model_config(self.cfg.model, **defaults)
        return self.source.adapt_model(mc) if self.source is not None else mc

    def inputs(self, batch: Any) -> Any:
        """The model input of a batch: the first element of a tuple/list, else the batch."""
        return batch[0] if isinstance(batch, (list, tuple)) else batch


# ------------------------------------------------------------- config-time shape checks
# helpers for Task.check_config: each raises one ValueError line naming the keys to change
def model_tokenizer(cfg) -> tuple[str, dict]:
    """(tokenizer name, tokenizer args) of the config's model (size + overrides)."""
    from unipred.train.config import build_model_config

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

    The engine sets ``self.want_stats = True`` on the steps where it wants collapse statistics.
    """

    objective: ClassVar[str] = "pretrain"
    summary: ClassVar[str] = "Next-embedding pretraining"
    want_stats: bool = False

    def build_model(self) -> nn.Module:
        from unipred.nn.model import NEPA

        mc = self.model_config(head="none")
        if mc.objective.auto and self.source is not None:
            mc = self._auto_objective(mc)
        return NEPA(mc)

    def _auto_objective(self, mc):
        """``model.objective.auto``: the objective chosen from the data (unipred.task.auto). The
        choice is written into the run config (auto off, keys set), so checkpoints, exports
        and resumed runs rebuild the same model without reading the data again."""
        from unipred.nn.model import build_tokenizer
        from unipred.task import auto

        section = self.cfg.model.objective
        explicit = {f.name for f in dataclasses.fields(section) if getattr(section, f.name)
                    is not None} - {"auto"}  # fmt: skip
        tok = build_tokenizer(mc.tokenizer, mc.predictor.dim, mc.tokenizer_args)
        mc = auto.resolve(mc, self.source, tok, explicit)
        for key in ("target_norm", "head", "horizon"):
            setattr(section, key, getattr(mc.objective, key))
        section.auto = False
        mc.objective = dataclasses.replace(mc.objective, auto=False)
        return mc

    def training_step(self, model, batch):
        out = model(self.inputs(batch))
        logs = {"loss": out.loss.detach()}
        if self.want_stats:
            stats = collapse_stats(out.predictions, out.valid)
            logs.update({f"collapse/{k}": v for k, v in stats.items()})
            # the targets: without stop-gradient these are what collapses first
            stats = collapse_stats(out.targets, out.valid)
            logs.update({f"collapse/target_{k}": v for k, v in stats.items()})
        if self.source is not None:
            logs.update(self.source.step_logs())
        return out.loss, logs

    def validation_step(self, model, batch, metrics):
        return {"loss": model(self.inputs(batch)).loss}


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
        super().check_config(cfg)

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
        from unipred.protocols import FeatureCache, frozen_features

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


# ------------------------------------------------------------------------------ registration


OBJECTIVES: dict[str, type[Task]] = {"pretrain": PretrainTask, "classify": ClassifyTask}


def all_objectives() -> dict[str, type[Task]]:
    """Every generic objective by name (segmentation lives in unipred.segment)."""
    from unipred.task.segment import SegmentTask

    return {**OBJECTIVES, "segment": SegmentTask}


def register_data(name: str, objectives=("pretrain", "classify"), tasks: dict | None = None):
    """Class decorator: register a ``DataSource`` as ``name`` and, for every objective, the task
    ``{name}_{objective}`` (``tasks`` may rename some: {"classify": "my_cls"}). The task
    classes are ``source.tasks[objective]`` and attributes of the source's module. The
    objectives: "pretrain", "classify" (unipred.task) and "segment" (unipred.segment: the
    source yields dense label maps and may set ``label_axes``)."""
    import sys

    from unipred.base.registry import DATASETS, TASKS

    def deco(source: type[DataSource]):
        DATASETS.register(name)(source)
        made = {}
        known = all_objectives()
        for obj in objectives:
            if obj not in known:
                raise KeyError(f"data {name!r}: unknown objective {obj!r}; known: "
                               f"{sorted(known)}")  # fmt: skip
            task_name = (tasks or {}).get(obj, f"{name}_{obj}")
            cls = known[obj].on(source, task_name, name)
            TASKS.register(task_name)(cls)
            made[obj] = cls
            module = sys.modules.get(source.__module__)  # importable by name (pickling)
            if module is not None and not hasattr(module, cls.__name__):
                setattr(module, cls.__name__, cls)
            dc = cls.data_config
            if module is not None and not hasattr(module, dc.__name__):
                dc.__module__ = source.__module__
                setattr(module, dc.__name__, dc)
        source.tasks = made
        return source

    return deco
