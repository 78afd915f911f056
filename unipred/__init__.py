"""unipred: self-supervised pretraining by next-embedding prediction, for any modality.

The names below are the public API, for users and for plugin authors: a plugin registers a
tokenizer (``TOKENIZERS``), data sources (``register_data``: the generic objectives, pretraining,
classification and segmentation, then train on them), model sizes (``MODELS``) and, if it
wants, segmentation decoders (``DECODERS``); see
docs/adding-a-modality.md. Importing ``unipred`` loads no modality library.

The names are imported on first use (PEP 562), so that ``import unipred`` and therefore the
``unipred`` command start without torch: ``unipred --help`` prints at once, and a command pays
for torch only when it needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from unipred import _compat
from unipred._version import __version__

_compat.install()  # the old flat module paths (unipred.model, ...) stay importable

# public name -> the module that defines it
_WHERE = {
    "DatasetBuilder": "unipred.base.contracts",
    "Tokenizer": "unipred.base.contracts",
    "next_embedding_loss": "unipred.nn.loss",
    "NEPA": "unipred.nn.model",
    "ModelConfig": "unipred.nn.model",
    "model_config": "unipred.nn.model",
    "Predictor": "unipred.nn.predictor",
    "PredictorConfig": "unipred.nn.predictor",
    "DATASETS": "unipred.base.registry",
    "DECODERS": "unipred.base.registry",
    "MODELS": "unipred.base.registry",
    "TASKS": "unipred.base.registry",
    "TOKENIZERS": "unipred.base.registry",
    "SegmentData": "unipred.task.segment",
    "SegmentOutput": "unipred.task.segment",
    "SegmentTask": "unipred.task.segment",
    "ClassifyData": "unipred.task",
    "ClassifyTask": "unipred.task",
    "DataConfig": "unipred.task",
    "DataSource": "unipred.task",
    "PretrainTask": "unipred.task",
    "Task": "unipred.task",
    "register_data": "unipred.task",
    "Tokens": "unipred.base.tokens",
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'unipred' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from unipred.base.contracts import DatasetBuilder, Tokenizer
    from unipred.base.registry import DATASETS, DECODERS, MODELS, TASKS, TOKENIZERS
    from unipred.base.tokens import Tokens
    from unipred.nn.loss import next_embedding_loss
    from unipred.nn.model import NEPA, ModelConfig, model_config
    from unipred.nn.predictor import Predictor, PredictorConfig
    from unipred.task import (
        ClassifyData,
        ClassifyTask,
        DataConfig,
        DataSource,
        PretrainTask,
        Task,
        register_data,
    )
    from unipred.task.segment import SegmentData, SegmentOutput, SegmentTask

__all__ = [
    "DATASETS",
    "DECODERS",
    "MODELS",
    "NEPA",
    "TASKS",
    "TOKENIZERS",
    "ClassifyData",
    "ClassifyTask",
    "DataConfig",
    "DataSource",
    "DatasetBuilder",
    "ModelConfig",
    "Predictor",
    "PredictorConfig",
    "PretrainTask",
    "SegmentData",
    "SegmentOutput",
    "SegmentTask",
    "Task",
    "Tokenizer",
    "Tokens",
    "__version__",
    "model_config",
    "next_embedding_loss",
    "register_data",
]
