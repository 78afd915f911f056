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

from unipred._version import __version__

# public name -> the module that defines it
_WHERE = {
    "DatasetBuilder": "unipred.contracts",
    "Tokenizer": "unipred.contracts",
    "next_embedding_loss": "unipred.loss",
    "NEPA": "unipred.model",
    "ModelConfig": "unipred.model",
    "model_config": "unipred.model",
    "Predictor": "unipred.predictor",
    "PredictorConfig": "unipred.predictor",
    "DATASETS": "unipred.registry",
    "DECODERS": "unipred.registry",
    "MODELS": "unipred.registry",
    "TASKS": "unipred.registry",
    "TOKENIZERS": "unipred.registry",
    "SegmentData": "unipred.segment",
    "SegmentOutput": "unipred.segment",
    "SegmentTask": "unipred.segment",
    "ClassifyData": "unipred.task",
    "ClassifyTask": "unipred.task",
    "DataConfig": "unipred.task",
    "DataSource": "unipred.task",
    "PretrainTask": "unipred.task",
    "Task": "unipred.task",
    "register_data": "unipred.task",
    "Tokens": "unipred.tokens",
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
    from unipred.contracts import DatasetBuilder, Tokenizer
    from unipred.loss import next_embedding_loss
    from unipred.model import NEPA, ModelConfig, model_config
    from unipred.predictor import Predictor, PredictorConfig
    from unipred.registry import DATASETS, DECODERS, MODELS, TASKS, TOKENIZERS
    from unipred.segment import SegmentData, SegmentOutput, SegmentTask
    from unipred.task import (
        ClassifyData,
        ClassifyTask,
        DataConfig,
        DataSource,
        PretrainTask,
        Task,
        register_data,
    )
    from unipred.tokens import Tokens

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
