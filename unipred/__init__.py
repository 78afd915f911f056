"""unipred: self-supervised pretraining by next-embedding prediction, for any modality.

The names below are the public API, for users and for plugin authors: a plugin registers a
tokenizer (``TOKENIZERS``), data sources (``register_data``: the generic objectives, pretraining,
classification and segmentation, then train on them), model sizes (``MODELS``) and, if it
wants, segmentation decoders (``DECODERS``); see
docs/adding-a-modality.md. Importing ``unipred`` loads no modality library.

The names are the modules' own (``unipred.NEPA is unipred.nn.model.NEPA``). One exception to
"import everything at once": while the ``unipred`` command starts (the console script, or
``python -m unipred``), nothing heavy is imported here, so ``unipred --help`` prints without
torch; the command imports the rest (:func:`load_all`) before any command that needs it, and
any public name read from this package does the same.
"""

import importlib
import os
import sys

from unipred import _compat
from unipred._version import __version__

# public name -> the module that defines it
_WHERE = {
    "DatasetBuilder": "unipred.base.contracts",
    "Tokenizer": "unipred.base.contracts",
    "DATASETS": "unipred.base.registry",
    "DECODERS": "unipred.base.registry",
    "MODELS": "unipred.base.registry",
    "TASKS": "unipred.base.registry",
    "TOKENIZERS": "unipred.base.registry",
    "Tokens": "unipred.base.tokens",
    "next_embedding_loss": "unipred.nn.loss",
    "NEPA": "unipred.nn.model",
    "ModelConfig": "unipred.nn.model",
    "model_config": "unipred.nn.model",
    "Predictor": "unipred.nn.predictor",
    "PredictorConfig": "unipred.nn.predictor",
    "ClassifyData": "unipred.task",
    "ClassifyTask": "unipred.task",
    "DataConfig": "unipred.task",
    "DataSource": "unipred.task",
    "PretrainTask": "unipred.task",
    "Task": "unipred.task",
    "register_data": "unipred.task",
    "SegmentData": "unipred.task.segment",
    "SegmentOutput": "unipred.task.segment",
    "SegmentTask": "unipred.task.segment",
}
# imported for their registrations: higher layers register what lower ones read (joint
# checkpoints for model.init=pretrain:, official NEPA weights for model.init=official:, model
# folders, NEPA.save_pretrained / from_pretrained / push_to_hub), so the tables are full before
# anything reads them (docs/architecture.md)
_REGISTERING = ("unipred.task.joint", "unipred.weights.hub", "unipred.weights.pretrained")
_loaded = False


def load_all() -> None:
    """Import every public name and every registering module (what ``import unipred`` does
    outside the command's start-up)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, module in _WHERE.items():
        globals()[name] = getattr(importlib.import_module(module), name)
    for module in _REGISTERING:
        importlib.import_module(module)


def _command_starting() -> bool:
    """True while the ``unipred`` console script or ``python -m unipred[.cli]`` starts."""
    if sys.argv and os.path.basename(sys.argv[0]) in ("unipred", "unipred.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(orig[:-1]):
        if arg == "-m":
            return orig[i + 1] in ("unipred", "unipred.cli")
    return False


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'unipred' has no attribute {name!r}")
    load_all()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


_compat.install()  # the old flat module paths (unipred.model, ...) stay importable
if not _command_starting():
    load_all()

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
