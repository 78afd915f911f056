"""unipred: self-supervised pretraining by next-embedding prediction, for any modality.

The names below are the public API, for users and for plugin authors: a plugin registers a
tokenizer (``TOKENIZERS``), data sources (``register_data``: the generic objectives, pretraining,
classification and segmentation, then train on them), model sizes (``MODELS``) and, if it
wants, segmentation decoders (``DECODERS``); see
docs/adding-a-modality.md. Importing ``unipred`` loads no modality library.
"""

from unipred import _compat
from unipred._version import __version__
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
from unipred.task import joint as _joint  # noqa: F401
from unipred.task.segment import SegmentData, SegmentOutput, SegmentTask
from unipred.weights import hub as _hub  # noqa: F401
from unipred.weights import pretrained as _pretrained  # noqa: F401

# joint, hub and pretrained are imported for their registrations: higher layers register
# what lower ones read (joint checkpoints for model.init=pretrain:, official NEPA weights for
# model.init=official:, model folders, NEPA.save_pretrained / from_pretrained / push_to_hub),
# so the tables are full before anything reads them (docs/architecture.md)
_compat.install()  # the old flat module paths (unipred.model, ...) stay importable

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
