"""Whether ``builtin_plugins.json`` still says what the built-in plugins register, decided
from their source files alone (no import): the first ``unipred list`` of a source checkout.

What importing the built-in plugins registers (names, and the first line of each registered
object's docstring) is a function of the code that *runs* during those imports: the
module-level code of every module they import (class bodies included) and the bodies of the
functions called on the way (``register_data``, the registries, the contract checks), plus any
file read then. A function whose body did not run cannot have changed the outcome, and stays
unable to as long as the code that did run is unchanged.

So ``--write-manifest`` imports the plugins in a fresh interpreter under a trace
(:func:`record`) and stores, for every file of unipred's packages that was imported: its
content hash, the qualified names of the functions that ran, and a hash of its syntax tree in
which every *other* function body is reduced to its docstring (:func:`reduced_hash`; names,
arguments, defaults and decorators are kept, and so are comments and layout changes ignored).
A checkout is current (:func:`current`) when every such file has the same bytes, or else the
same reduced tree; the set of plugin modules is unchanged; every data file read is unchanged;
and the Python minor version matches (syntax trees differ across versions). Editing the body
of a function that did not run (most edits) keeps the manifest usable; anything else makes
``unipred list`` import the plugins, as before, until the manifest is written again.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

_PACKAGES = ("unipred", "unipred.tasks", "unipred.tokenizers")


def _roots() -> dict[str, Path]:
    """Package name -> its folder, for unipred and its built-in plugin packages (imports only
    their light ``__init__`` modules)."""
    import importlib.util

    out = {}
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{name} is not a package")
        out[name] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return out


def _key(path: str | Path, roots: dict[str, Path]) -> str | None:
    """``PACKAGE:relative/path`` of a file under one of the roots (the deepest), else None."""
    p = Path(path).resolve()
    best = None
    for name, root in roots.items():
        if p.is_relative_to(root) and (best is None or len(root.parts) > len(roots[best].parts)):
            best = name
    return None if best is None else f"{best}:{p.relative_to(roots[best]).as_posix()}"


def _path(key: str, roots: dict[str, Path]) -> Path:
    name, _, rel = key.partition(":")
    return roots[name] / rel


def plugin_module_names(roots: dict[str, Path]) -> list[str]:
    """The built-in plugin modules (what ``registry.builtin_plugin_modules`` imports), found
    by listing their folders."""
    import pkgutil

    mods = []
    for name in _PACKAGES[1:]:
        mods += [f"{name}.{m.name}" for m in pkgutil.iter_modules([str(roots[name])])]
    return sorted(mods)


class _Reduce(ast.NodeTransformer):
    """Replace the body of every function whose qualified name is not in ``ran`` by its
    docstring (or ``pass``)."""

    def __init__(self, ran: set[str]):
        self.ran = ran
        self.scope: list[str] = []

    def _function(self, node):
        qual = ".".join([*self.scope, node.name])
        if qual in self.ran:
            return node  # ran: kept whole, nested definitions included
        doc = ast.get_docstring(node, clean=False)
        node.body = [ast.Expr(ast.Constant(doc))] if doc is not None else [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)  # a class body runs at import: kept, its methods reduced
        self.scope.pop()
        return node


def reduced_hash(source: bytes, ran: set[str]) -> str:
    """The hash of ``source``'s syntax tree with the bodies of the functions not in ``ran``
    reduced to their docstrings (layout and comments never count)."""
    tree = _Reduce(ran).visit(ast.parse(source))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


# Run in a fresh interpreter by record(): the trace starts before unipred is imported.
_RECORDER = r"""
import json, sys
ran, opened = set(), set()
def trace(frame, event, arg):
    ran.add((frame.f_code.co_filename, frame.f_code.co_qualname))
def audit(event, args):
    if event == "open" and isinstance(args[0], str):
        opened.add(args[0])
sys.addaudithook(audit)
sys.settrace(trace)
from unipred.listing import compute_builtin
listing = compute_builtin()
sys.settrace(None)
files = {m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
print(json.dumps({"listing": listing, "ran": sorted(ran), "files": sorted(files),
                  "opened": sorted(opened)}))
"""


def record() -> tuple[dict, dict]:
    """Import the built-in plugins in a fresh interpreter under a trace: (their listing, the
    ``sources`` record that :func:`current` checks)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", _RECORDER], capture_output=True, text=True,
                       env={**env, "PYTHONSAFEPATH": "1"}, check=False)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"recording the built-in plugins failed:\n{p.stderr[-3000:]}")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    roots = _roots()
    ran: dict[str, set[str]] = {}
    for filename, qual in got["ran"]:
        key = _key(filename, roots) if os.path.isabs(filename) else None
        if key is not None and filename.endswith(".py"):
            ran.setdefault(key, set()).add(qual.split(".<locals>.")[0])
    files = {}
    for f in got["files"]:
        key = _key(f, roots)
        if key is None or not f.endswith(".py"):
            continue
        src = Path(f).read_bytes()
        names = ran.get(key, set()) - {"<module>"}
        files[key] = {"sha256": hashlib.sha256(src).hexdigest(), "ran": sorted(names),
                      "tree": reduced_hash(src, names)}  # fmt: skip
    data = {}
    for f in got["opened"]:
        key = _key(f, roots)
        if key is not None and not f.endswith((".py", ".pyc")) and Path(f).is_file():
            data[key] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
    sources = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
               "plugins": plugin_module_names(roots), "files": files, "data": data}  # fmt: skip
    return got["listing"], sources


def current(sources: dict) -> bool:
    """Whether the source files still match ``sources`` (the module docstring's rule)."""
    if sources.get("python") != f"{sys.version_info[0]}.{sys.version_info[1]}":
        return False
    roots = _roots()
    if plugin_module_names(roots) != sources.get("plugins"):
        return False
    for key, want in sources.get("data", {}).items():
        try:
            if hashlib.sha256(_path(key, roots).read_bytes()).hexdigest() != want:
                return False
        except OSError:
            return False
    for key, rec in sources.get("files", {}).items():
        try:
            src = _path(key, roots).read_bytes()
        except OSError:
            return False
        if hashlib.sha256(src).hexdigest() == rec["sha256"]:
            continue
        try:
            if reduced_hash(src, set(rec["ran"])) != rec["tree"]:
                return False
        except SyntaxError:
            return False
    return bool(sources.get("files"))
