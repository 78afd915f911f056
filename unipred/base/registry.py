"""Name -> builder registries, filled by plugin modules. Duplicate or unknown names fail loudly.

Plugins are the modules under ``unipred.tokenizers`` and ``unipred.tasks`` (built in) and the
modules named by installed packages in the ``unipred.plugins`` entry-point group (external;
see docs/adding-a-modality.md). They are imported on the first lookup, each on its own: one
that fails to import is remembered and named when a lookup misses, and never leaves the
registries half-filled for the others.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points

PLUGIN_GROUP = "unipred.plugins"
BUILTIN_PACKAGES = ("unipred.tokenizers", "unipred.tasks")


class Registry:
    def __init__(self, kind: str, check: str = ""):
        self.kind = kind
        self._items: dict[str, Callable] = {}
        self._check = check  # a registration check in unipred.base.contracts.CHECKS

    def register(self, name: str | None = None):
        def deco(fn):
            key = name or fn.__name__
            if key in self._items and self._items[key] is not fn:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            if self._check:
                from unipred.base.contracts import run_check

                run_check(self._check, key, fn)
            self._items[key] = fn
            return fn

        return deco

    def add(self, name: str, obj) -> None:
        """Register ``obj`` under ``name`` (the non-decorator form)."""
        self.register(name)(obj)

    def get(self, name: str) -> Callable:
        load_plugins()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            broken = "".join(f"; plugin {m} failed to load: {e}" for m, e in PLUGIN_ERRORS.items())
            raise KeyError(
                f"unknown {self.kind} {name!r}{hint}; known: {sorted(self._items)}{broken}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def registered(self) -> dict[str, Callable]:
        """What is registered so far, without importing any plugin (``unipred list`` reads
        the built-in plugins' names from a manifest and imports only the others)."""
        return dict(self._items)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items


TOKENIZERS = Registry("tokenizer", check="check_tokenizer")
TASKS = Registry("task", check="check_task")
MODELS = Registry("model")
# data sources of the modalities (unipred.task.DataSource, registered with register_data)
DATASETS = Registry("data source", check="check_data")
# segmentation decoders (unipred.task.segment): name -> fn(model_config, num_classes, task) -> model
DECODERS = Registry("segmentation decoder")
# extra `unipred` commands a modality brings: "demo NAME", "data NAME", "visualize" -> the
# module that runs it (imported only when the command runs; it defines main(argv) -> int, or
# for "data NAME" add_arguments(parser) and run(args) -> int)
COMMANDS = Registry("command")

# module -> one-line reason, for every plugin module that failed to import
PLUGIN_ERRORS: dict[str, str] = {}
_loaded = False


def import_plugin(module: str) -> None:
    """Import one plugin module, remembering (in PLUGIN_ERRORS) why it failed, if it did."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken plugin must not break the others
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        PLUGIN_ERRORS[module] = f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def builtin_plugin_modules() -> list[str]:
    """The plugin modules unipred ships (its modalities and the joint task)."""
    mods = []
    for pkg_name in BUILTIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        mods += [f"{pkg_name}.{info.name}" for info in pkgutil.iter_modules(pkg.__path__)]
    mods.append("unipred.task.joint")  # the modality-free joint pretraining task and tokenizer
    return mods


def entry_point_modules() -> list[str]:
    """The plugin modules installed packages declare (``unipred.plugins`` entry points)."""
    return [ep.value.split(":")[0] for ep in entry_points(group=PLUGIN_GROUP)]


def plugin_modules() -> list[str]:
    """Every plugin module: the built-in ones, then those installed packages declare."""
    return builtin_plugin_modules() + entry_point_modules()


def load_plugins() -> None:
    """Import every plugin module once, so that their registrations run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in plugin_modules():
        import_plugin(module)
