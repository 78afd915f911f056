"""Tiny name -> builder registries. Duplicate or unknown names fail loudly."""

from __future__ import annotations

import difflib
from collections.abc import Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str | None = None):
        def deco(fn):
            key = name or fn.__name__
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:
        _load_plugins()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; known: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        _load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_plugins()
        return name in self._items


TOKENIZERS = Registry("tokenizer")
TASKS = Registry("task")
MODELS = Registry("model")

_loaded = False


def _load_plugins() -> None:
    """Import every built-in tokenizer and task module so their registrations run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    for pkg_name in ("unipred.tokenizers", "unipred.tasks"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg_name}.{info.name}")
    importlib.import_module("unipred.model")
