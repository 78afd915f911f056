"""The Task contract: what a task file in tasks/ provides so the one engine can run it.

A task is a class registered in ``unipred.registry.TASKS``. It names a data-config dataclass
(``data_config``), builds its model and datasets, and computes the loss and metrics of one
batch. The engine (unipred/engine.py) owns everything else: optimizer, schedule, precision,
EMA, checkpoints, distributed, logging. Tasks never import Lightning.
"""

from __future__ import annotations

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

    # -- building ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_dataset(self, split: str) -> torch.utils.data.Dataset | None:
        """split in {"train", "val"}; map-style or IterableDataset; None if the split is absent."""
        raise NotImplementedError

    def collate_fn(self, split: str):
        """Optional batch collation (e.g. Mixup/CutMix, padding); None = default collate."""
        return None

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
