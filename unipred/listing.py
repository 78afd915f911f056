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

Without a current cache, an installed release does not import its own plugins either: what
they register is shipped in ``builtin_plugins.json`` beside this file (written by ``python -m
unipred.listing --write-manifest``; ``tests/test_listing.py`` fails when it differs from what
importing them registers), and only the plugins of other packages (entry points) are
imported. A source checkout (an editable install, whose files change under it) uses the
manifest only while it is current for the checkout's files (unipred.listing_sources: decided
without importing anything), and imports its plugins otherwise. ``UNIPRED_PLUGIN_MANIFEST=1``
/ ``=0`` forces either way.
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
_FORMAT = 2  # bumped when the cached layout or the way descriptions are made changes


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


def _summary(doc: str | None, width: int = 110) -> str:
    """The first paragraph of a docstring on one line, cut at a word with "..." past ``width``
    (its first line alone used to end mid-phrase where the docstring was wrapped)."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    if len(para) <= width:
        return para
    return para[: width - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def _collect() -> dict:
    """The listing of what the registries hold now (imports nothing)."""
    from unipred.base import registry

    sections = []
    for title, attr in SECTIONS:
        items = getattr(registry, attr).registered()
        rows = []
        for name in sorted(items):
            rows.append([name, _summary(items[name].__doc__)])
        sections.append([title, rows])
    commands = sorted([k, v] for k, v in registry.COMMANDS.registered().items())
    return {"sections": sections, "commands": commands, "errors": dict(registry.PLUGIN_ERRORS)}


def compute() -> dict:
    """The listing, from the registries (imports every plugin)."""
    from unipred.base import registry

    registry.load_plugins()
    return _collect()


def compute_builtin() -> dict:
    """The listing of unipred's own plugins alone (imports them, and no other package's):
    what ``builtin_plugins.json`` holds."""
    from unipred.base import registry

    for module in registry.builtin_plugin_modules():
        registry.import_plugin(module)
    return _collect()


MANIFEST = Path(__file__).with_name("builtin_plugins.json")
MANIFEST_ENV = "UNIPRED_PLUGIN_MANIFEST"


def _editable_install() -> bool:
    """Whether unipred runs from a source tree (an editable install, or none at all), whose
    files may differ from the manifest written for them (PEP 610's direct_url.json)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        text = distribution("unipred").read_text("direct_url.json")
    except PackageNotFoundError:
        return True
    return bool(text) and bool(json.loads(text).get("dir_info", {}).get("editable"))


def read_manifest() -> dict | None:
    """The built-in plugins' listing shipped with unipred, when this install may use it: an
    installed release always; a source checkout while the manifest is current for its files
    (unipred.listing_sources: no import, a hash or syntax-tree comparison per file)."""
    choice = os.environ.get(MANIFEST_ENV, "")
    if choice == "0":
        return None
    try:
        data = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return None
    if choice != "1" and _editable_install():
        from unipred.listing_sources import current

        try:
            if not current(data.get("sources") or {}):
                return None
        except Exception:  # noqa: BLE001 - when in doubt, import the plugins
            return None
    return data.get("listing")


def compute_with_manifest(manifest: dict) -> dict:
    """The built-in plugins' listing from ``manifest``, plus what the plugins of other
    packages register: only those are imported (and torch only if they import it)."""
    from unipred.base import registry

    for module in registry.entry_point_modules():
        registry.import_plugin(module)
    live = _collect()  # the entry points' names (and any built-in module they imported)
    sections = []
    for (title, rows), (_, more) in zip(manifest["sections"], live["sections"]):
        merged = dict(map(tuple, rows)) | dict(map(tuple, more))
        sections.append([title, [[n, merged[n]] for n in sorted(merged)]])
    commands = dict(map(tuple, manifest["commands"])) | dict(map(tuple, live["commands"]))
    return {"sections": sections, "commands": [[n, commands[n]] for n in sorted(commands)],
            "errors": live["errors"]}  # fmt: skip


def write_manifest(path: Path = MANIFEST) -> Path:
    """Write ``builtin_plugins.json``: the built-in plugins' listing and the record of the
    source files it was computed from (unipred.listing_sources; the plugins are imported in a
    fresh interpreter, so that no other package's plugin is in the registries)."""
    from unipred.listing_sources import record

    data, sources = record()
    if data["errors"]:
        raise RuntimeError(f"built-in plugins failed to import: {data['errors']}")
    # one name (or source file) per line, so that a change shows as the lines it changes
    row = json.dumps
    lines = [f'{{"format": {_FORMAT}, "listing": {{"errors": {{}}, "sections": [']
    for i, (title, rows) in enumerate(data["sections"]):
        lines.append(f" [{row(title)}, [")
        lines += [f"  {row(r)}," for r in rows[:-1]] + [f"  {row(r)}" for r in rows[-1:]]
        lines.append(" ]]" + ("," if i < len(data["sections"]) - 1 else ""))
    lines.append('], "commands": [')
    cmds = data["commands"]
    lines += [f" {row(c)}," for c in cmds[:-1]] + [f" {row(c)}" for c in cmds[-1:]]
    lines.append(']}, "sources": {')
    head = {k: v for k, v in sources.items() if k != "files"}
    lines += [f" {row(k)}: {row(v)}," for k, v in head.items()]
    lines.append(' "files": {')
    files = sorted(sources["files"].items())
    lines += [f"  {row(k)}: {row(v, sort_keys=True)}," for k, v in files]
    lines[-1] = lines[-1].rstrip(",")
    lines.append("}}}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == {"format": _FORMAT, "listing": data, "sources": sources}
    path.write_text(text)
    return path


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
    manifest = read_manifest()
    data = compute() if manifest is None else compute_with_manifest(manifest)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "listing": data}))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError:
        pass  # a read-only home: list without caching
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m unipred.listing --write-manifest`` (after changing what a built-in plugin
    registers) or ``--print-builtin`` (the listing it would write, as JSON)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--write-manifest"]:
        print(f"wrote {write_manifest()}")
        return 0
    if args == ["--print-builtin"]:
        print(json.dumps(compute_builtin()))
        return 0
    print("usage: python -m unipred.listing --write-manifest | --print-builtin", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
