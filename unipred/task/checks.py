"""The registration checks of tasks and data sources: a class that lacks what the engine
calls fails when it is registered, in one line naming what is missing. Registered with the
base layer's ``contracts.CHECKS`` (which cannot import this layer)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from unipred.base.contracts import CHECKS, ContractError, _where
from unipred.task.base import DataConfig, DataSource, Task
from unipred.task.classify import ClassifyTask


def check_task(name: str, cls: Any) -> None:
    """Fail at registration when a task class lacks what the engine calls."""
    where = _where("task", name, cls)
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise ContractError(f"{where}: register a subclass of unipred.Task")
    missing = []
    if cls.build_dataset is Task.build_dataset and cls.data_class is None:
        missing.append("build_dataset(split) or a data source (register_data)")
    if not (inspect.isclass(cls.data_config) and issubclass(cls.data_config, DataConfig)):
        missing.append("data_config (a dataclass subclassing unipred.DataConfig)")
    fields = getattr(cls.data_config, "__dataclass_fields__", {})
    if issubclass(cls, ClassifyTask) and "num_classes" not in fields:
        missing.append("a num_classes field in its data_config")
    if missing:
        raise ContractError(f"{where} lacks " + "; ".join(missing))


def check_data(name: str, cls: Any) -> None:
    """Fail at registration when a data source lacks part of ``unipred.DataSource``."""
    where = _where("data", name, cls)
    if not (inspect.isclass(cls) and issubclass(cls, DataSource)):
        raise ContractError(f"{where}: register a subclass of unipred.DataSource")
    missing = []
    if cls.build is DataSource.build:
        missing.append("build(split, augment)")
    if not (inspect.isclass(cls.config) and issubclass(cls.config, DataConfig)):
        missing.append("config (a dataclass subclassing unipred.DataConfig)")
    elif not dataclasses.is_dataclass(cls.config):
        missing.append("config as a @dataclass")
    if missing:
        raise ContractError(f"{where} lacks " + "; ".join(missing))


CHECKS.update(check_task=check_task, check_data=check_data)
