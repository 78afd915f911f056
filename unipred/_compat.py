"""The flat module paths of unipred <= 0.x (``unipred.model``, ``unipred.checkpoint``, ...) keep
working: each old name is the very module object of its new home in a layer package.

Plugins, tasks/, tokenizers/, tests and user code import the old paths; the core itself imports
only the new ones (tests/test_core_imports.py checks that, and import-linter checks the layers).
An alias is the same object, not a copy, so ``monkeypatch.setattr("unipred.engine.x", ...)``
patches what the engine really uses, and it is imported lazily: importing ``unipred`` does not
load Lightning because an old name exists.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

# old module -> its home in the layers (see docs/architecture.md)
MOVED = {
    "unipred.registry": "unipred.base.registry",
    "unipred.contracts": "unipred.base.contracts",
    "unipred.tokens": "unipred.base.tokens",
    "unipred.extras": "unipred.base.extras",
    "unipred.quiet": "unipred.base.quiet",
    "unipred.threads": "unipred.base.threads",
    "unipred.rope": "unipred.nn.rope",
    "unipred.predictor": "unipred.nn.predictor",
    "unipred.loss": "unipred.nn.loss",
    "unipred.heads": "unipred.nn.heads",
    "unipred.objectives": "unipred.nn.objectives",
    "unipred.model": "unipred.nn.model",
    "unipred.loader": "unipred.data.loader",
    "unipred.optim": "unipred.train.optim",
    "unipred.callbacks": "unipred.train.callbacks",
    "unipred.checkpoint": "unipred.train.checkpoint",
    "unipred.trainer": "unipred.train.trainer",
    "unipred.engine": "unipred.train.engine",
    "unipred.config": "unipred.train.config",
    "unipred.rundir": "unipred.train.rundir",
    "unipred.segment": "unipred.task.segment",
    "unipred.joint": "unipred.task.joint",
    "unipred.seg_metrics": "unipred.task.seg_metrics",
    "unipred.baselines": "unipred.protocols.baselines",
    "unipred.hub": "unipred.weights.hub",
    "unipred.pretrained": "unipred.weights.pretrained",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and hands back the already-importable new module under it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        real = importlib.import_module(MOVED[spec.name])
        spec.loader_state = real.__spec__
        return real

    def exec_module(self, module):
        # the import system stamped the old name's spec on the module: give it back its own,
        # so that reload(), pickling and tracebacks see the real module
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the alias finder on sys.meta_path once."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
