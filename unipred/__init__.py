"""unipred: self-supervised pretraining by next-embedding prediction, for any modality."""

from unipred.loss import next_embedding_loss
from unipred.model import NEPA, ModelConfig, model_config
from unipred.predictor import Predictor, PredictorConfig
from unipred.tokens import Tokens

__all__ = [
    "NEPA",
    "ModelConfig",
    "Predictor",
    "PredictorConfig",
    "Tokens",
    "model_config",
    "next_embedding_loss",
]
__version__ = "0.1.0"
