"""``register_data``: a data source becomes one task per objective (``NAME_pretrain``,
``NAME_classify``, ``NAME_segment``)."""

from __future__ import annotations

from unipred.task.base import DataSource, Task
from unipred.task.classify import ClassifyTask
from unipred.task.pretrain import PretrainTask

OBJECTIVES: dict[str, type[Task]] = {"pretrain": PretrainTask, "classify": ClassifyTask}


def all_objectives() -> dict[str, type[Task]]:
    """Every generic objective by name (segmentation lives in unipred.task.segment)."""
    from unipred.task.segment import SegmentTask

    return {**OBJECTIVES, "segment": SegmentTask}


def register_data(name: str, objectives=("pretrain", "classify"), tasks: dict | None = None):
    """Class decorator: register a ``DataSource`` as ``name`` and, for every objective, the task
    ``{name}_{objective}`` (``tasks`` may rename some: {"classify": "my_cls"}). The task
    classes are ``source.tasks[objective]`` and attributes of the source's module. The
    objectives: "pretrain", "classify" (unipred.task) and "segment" (unipred.task.segment: the
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
