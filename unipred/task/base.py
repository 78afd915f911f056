"""The task contract: ``DataConfig`` (a task's ``data:`` section), ``DataSource`` (what a modality
supplies) and ``Task`` (an objective on a data set, what the engine runs), plus the config-time
shape checks a source calls (tokenizer kind, patch size)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class DataConfig:
    """Fields every task's data section has; tasks subclass it and add their own."""

    root: str = ""  # training data: a folder, a shard pattern ("/d/train-{000000..000127}.tar"),
    #                 a "pipe:" command or a URL; "" means the task's generated/demo data
    val_root: str = ""  # validation data, same forms; "": the data source decides (generated
    #                     data brings its own val split; data read from root has none)
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
    # segmentation (unipred.task.segment): the tokenizer coordinate axes the dense label maps span,
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
        """Catch shape mistakes before anything is built (``unipred.train.config.load_config`` calls
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
        """Catch shape mistakes before anything is built (``unipred.train.config.load_config`` calls
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
        probes; unipred/protocols/): labelled, with evaluation-time processing (no
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
        article = "an" if want[:1] in "aeiou" else "a"
        raise ValueError(
            f"model.name={model_name!r} uses the {tokenizer!r} tokenizer but this task reads "
            f"{want} data; pick {article} {want} model (`unipred list`) or set "
            f"model.tokenizer={want}"
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
