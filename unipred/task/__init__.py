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

The engine (unipred/train/engine.py) owns everything else: optimizer, schedule, precision, EMA,
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
  a function of (seed, epoch) only; see unipred/data/loader.py.
* Metrics are torchmetrics objects keyed by short names ("acc1"); the engine logs them as
  ``val/acc1`` (raw weights) and ``val_ema/acc1`` (EMA weights). ``monitor`` names the metric
  that selects the best checkpoint ("val/acc1"; the engine swaps in ``val_ema/`` when
  ``ema.monitor_ema``).
"""

from unipred.task.base import (
    DataConfig,
    DataSource,
    Task,
    check_patch,
    check_tokenizer,
    model_tokenizer,
)
from unipred.task.checks import check_data, check_task  # registers them with base.contracts
from unipred.task.classify import (
    MODES,
    ClassifyData,
    ClassifyTask,
    Indexed,
    IndexedCollate,
    dataset_labels,
    per_class_indices,
)
from unipred.task.pretrain import (
    PretrainTask,
    collapse_stats,
)
from unipred.task.register import (
    OBJECTIVES,
    all_objectives,
    register_data,
)

__all__ = [
    "check_data",
    "check_task",
    "DataConfig",
    "DataSource",
    "Task",
    "check_patch",
    "check_tokenizer",
    "model_tokenizer",
    "PretrainTask",
    "collapse_stats",
    "ClassifyData",
    "ClassifyTask",
    "Indexed",
    "IndexedCollate",
    "MODES",
    "dataset_labels",
    "per_class_indices",
    "OBJECTIVES",
    "all_objectives",
    "register_data",
]
