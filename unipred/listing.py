"""What the plugins registered, without importing them when nothing changed.

``unipred list`` (and ``unipred demo --help``) show every registered name, which means importing
every plugin module, and through them torch and Lightning: seconds before the first line. The
listing is therefore kept in a small JSON cache, reused only while nothing it was computed from
has changed: the unipred version and interpreter, the source files of the built-in plugins and
of the packages named in the ``unipred.plugins`` entry-point group, and the folders of
``sys.path`` (installing or removing a package changes its site-packages folder). Anything
else, a missing or unreadable cache included, computes the listing afresh.

The cache lives in ``$UNIPRED_CACHE`` or ``$XDG_CACHE_HOME/unipred`` (``~/.cache/unipred``);
it holds names and one-line descriptions only, never code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

SECTIONS = (
    ("tokenizers", "TOKENIZERS"),
    ("data sources", "DATASETS"),
    ("tasks", "TASKS"),
    ("segmentation decoders", "DECODERS"),
    ("model sizes", "MODELS"),
)
_FORMAT = 1  # bumped when the cached layout changes


def cache_dir() -> Path:
    """Where unipred keeps small caches (``$UNIPRED_CACHE``, else the XDG cache folder)."""
    if os.environ.get("UNIPRED_CACHE"):
        return Path(os.environ["UNIPRED_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unipred"


def _plugin_roots() -> list[Path]:
    """Folders (or files) holding the source of every plugin module, found without importing
    any of them."""
    from importlib.metadata import entry_points

    from unipred.base.registry import BUILTIN_PACKAGES, PLUGIN_GROUP

    roots = [Path(__file__).resolve().parent]
    names = list(BUILTIN_PACKAGES)
    names += [ep.value.split(":")[0].split(".")[0] for ep in entry_points(group=PLUGIN_GROUP)]
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin:
            roots.append(Path(spec.origin))
    return roots


def fingerprint() -> str:
    """A hash of everything the listing depends on (see the module docstring)."""
    from importlib.metadata import entry_points

    from unipred import __version__
    from unipred.base.registry import PLUGIN_GROUP

    h = hashlib.sha256()
    h.update(f"{_FORMAT}|{__version__}|{sys.executable}|{sys.version}\n".encode())
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: (e.name, e.value)):
        h.update(f"ep|{ep.name}|{ep.value}\n".encode())
    cwd = os.getcwd()
    for entry in sys.path:
        if entry in ("", ".", cwd):  # the working folder changes with every run; plugins
            continue  # found there are fingerprinted by their source files below
        try:
            h.update(f"path|{entry}|{os.stat(entry or '.').st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"path|{entry}|-\n".encode())
    for root in _plugin_roots():
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            h.update(f"src|{f}|{st.st_mtime_ns}|{st.st_size}\n".encode())
    return h.hexdigest()


def compute() -> dict:
    """The listing, from the registries (imports every plugin)."""
    from unipred.base import registry

    sections = []
    for title, attr in SECTIONS:
        reg = getattr(registry, attr)
        rows = []
        for name in reg.names():
            doc = (reg.get(name).__doc__ or "").strip().splitlines()
            rows.append([name, doc[0] if doc else ""])
        sections.append([title, rows])
    commands = [[name, registry.COMMANDS.get(name)] for name in registry.COMMANDS.names()]
    return {"sections": sections, "commands": commands, "errors": dict(registry.PLUGIN_ERRORS)}


def listing() -> dict:
    """``{"sections": [[title, [[name, first doc line], ...]], ...], "commands": [[name,
    module], ...], "errors": {module: reason}}``, from the cache when it is current."""
    try:
        key = fingerprint()
    except Exception:  # noqa: BLE001 - a cache must never be the reason a command fails
        return compute()
    path = cache_dir() / "registry.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["listing"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    data = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "listing": data}))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError:
        pass  # a read-only home: list without caching
    return data
