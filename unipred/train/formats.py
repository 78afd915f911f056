"""Weight formats defined above the training layer, registered here by the modules that know
them, so that checkpoint loading never imports upward (and this module stays light: no
Lightning, so ``import unipred`` can fill it cheaply).

* ``INIT_SOURCES``: ``model.init=KIND:PATH`` -> ``fn(model, path)``. ``ckpt`` and ``pretrain``
  come from unipred.train.checkpoint, ``official`` (a released NEPA checkpoint) from
  unipred.weights.hub.
* ``STATE_ADAPTERS``: a pretraining state dict of another layout -> ``(matches(sd),
  convert(model, sd, path, source) -> sd)``; ``joint`` (several tokenizers, one predictor) from
  unipred.task.joint.weights, used by ``model.init=pretrain:PATH@SOURCE``.
* ``MODEL_FOLDERS``: a model folder -> the model; ``pretrained`` (save_pretrained / official
  folders) from unipred.weights.pretrained, used by ``unipred eval ckpt=FOLDER``.

``import unipred`` imports every module that registers, so the tables are full whenever a
run reads them.
"""

from __future__ import annotations

from collections.abc import Callable

INIT_SOURCES: dict[str, Callable] = {}
STATE_ADAPTERS: dict[str, tuple[Callable, Callable]] = {}
MODEL_FOLDERS: dict[str, Callable] = {}


def load_model_folder(path):
    """The model saved in folder ``path`` (ours or an official NEPA folder)."""
    if "pretrained" not in MODEL_FOLDERS:
        raise RuntimeError(f"{path}: no model-folder reader registered: import unipred first")
    return MODEL_FOLDERS["pretrained"](path)
