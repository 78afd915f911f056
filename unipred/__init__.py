"""unipred: self-supervised pretraining by next-embedding prediction, for any modality.

The names below are the public API, for users and for plugin authors: a plugin registers a
tokenizer (``TOKENIZERS``), data sources (``register_data``: the generic objectives, pretraining,
classification and segmentation, then train on them), model sizes (``MODELS``) and, if it
wants, segmentation decoders (``DECODERS``); see
docs/adding-a-modality.md. Importing ``unipred`` loads no modality library.
"""

from unipred._version import __version__
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
