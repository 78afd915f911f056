"""``unipred list`` without its cache: an installed release reads its own plugins'
registrations from ``unipred/builtin_plugins.json`` instead of importing them (and torch), so
that file must say exactly what importing them registers; a source checkout reads it while
the code that ran to register them is unchanged (unipred.listing_sources), and imports them
otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unipred.listing import MANIFEST, _editable_install
from unipred.listing_sources import (
    _path,
    _roots,
    current,
    plugin_module_names,
    record,
    reduced_hash,
)


def _run(args, tmp_path, **env):
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONSAFEPATH": "1", **env},
    )  # fmt: skip


def test_the_manifest_says_what_the_built_in_plugins_register():
    # a fresh interpreter imports the built-in plugins under a trace (what --write-manifest runs)
    live, sources = record()
    shipped = json.loads(MANIFEST.read_text())["listing"]
    assert shipped == live, (
        "unipred/builtin_plugins.json is out of date with what the built-in plugins register: "
        "run `python -m unipred.listing --write-manifest` and commit it"
    )
    # the record names the code that ran to register them, and holds for these very files
    ran = sources["files"]
    assert "register_data" in ran["unipred:task/register.py"]["ran"]
    assert "Registry.register" in ran["unipred:base/registry.py"]["ran"]
    assert "Registry.get" not in ran["unipred:base/registry.py"]["ran"]
    assert "unipred.tasks:image/tasks.py" in ran and "unipred.tokenizers:image.py" in ran
    assert current(sources)


def _cold_list(tmp_path, name, **env):
    """``python -m unipred list`` from an empty cache: (imported torch?, stdout)."""
    p = _run(["-X", "importtime", "-m", "unipred", "list"], tmp_path,
             UNIPRED_CACHE=str(tmp_path / name), **env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    return bool(re.search(r"\|\s+torch$", p.stderr, re.M)), p.stdout


def test_a_cold_list_from_the_manifest_imports_no_torch_and_lists_the_same(tmp_path):
    assert _editable_install()  # this checkout: the manifest only while current for its files
    forced = _cold_list(tmp_path, "c1", UNIPRED_PLUGIN_MANIFEST="1")
    imported = _cold_list(tmp_path, "c0", UNIPRED_PLUGIN_MANIFEST="0")
    assert forced == (False, imported[1]) and imported[0]  # imported torch only when told
    assert "tokenizers:" in forced[1] and "  image_pretrain " in forced[1]
    # as a person runs it: from the manifest exactly when it is current for these files
    fresh = current(json.loads(MANIFEST.read_text()).get("sources") or {})
    assert _cold_list(tmp_path, "c", UNIPRED_PLUGIN_MANIFEST="") == (not fresh, imported[1])


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory):
    """A copy of unipred's, its tasks' and its tokenizers' source folders, with the manifest's
    record of them as it would be written for the copy (the same functions ran)."""
    roots = _roots()
    base = tmp_path_factory.mktemp("checkout")
    skip = shutil.ignore_patterns("__pycache__")
    copy = {n: Path(shutil.copytree(r, base / n.replace(".", "_"), ignore=skip))
            for n, r in roots.items()}  # fmt: skip
    sources = json.loads(MANIFEST.read_text())["sources"]
    for key, rec in sources["files"].items():
        src = _path(key, copy).read_bytes()
        rec.update(sha256=hashlib.sha256(src).hexdigest(), tree=reduced_hash(src, set(rec["ran"])))
    sources["plugins"] = plugin_module_names(copy)
    return copy, sources


def _edit(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))
    return text


@pytest.mark.parametrize(
    ("where", "old", "new", "still_current"),
    [
        # the body of a function that did not run while registering, comments, layout
        (
            "unipred:base/registry.py",
            "close = difflib",
            "# why\n            close  =  difflib",
            True,
        ),
        ("unipred.tasks:image/tasks.py", "\nimport ", "\n# a comment\n\nimport ", True),
        # a registered class's docstring (what `unipred list` prints)
        ("unipred.tokenizers:image.py", "(B, C, H, W) -> Tokens", "(B, C, H, W) => Tokens", False),
        # a registration's name, and the body of a function that ran (the task names)
        ("unipred.tokenizers:image.py", '"nepa_debug"', '"nepa_debug2"', False),
        ("unipred:task/register.py", 'f"{name}_{obj}"', 'f"{name}-{obj}"', False),
        # a new module-level function (module-level code runs at import)
        (
            "unipred:task/base.py",
            "\nclass Task",
            "\ndef helper():\n    pass\n\n\nclass Task",
            False,
        ),
    ],
)
def test_the_manifest_is_used_exactly_while_the_code_that_registers_is_unchanged(
    checkout_copy, monkeypatch, where, old, new, still_current
):
    import unipred.listing_sources as ls

    copy, sources = checkout_copy
    monkeypatch.setattr(ls, "_roots", lambda: copy)
    assert ls.current(sources)
    path = _path(where, copy)
    text = _edit(path, old, new)
    try:
        assert ls.current(sources) is still_current
    finally:
        path.write_text(text)
    assert ls.current(sources)


def test_a_new_plugin_module_or_a_changed_python_makes_the_manifest_stale(
    checkout_copy, monkeypatch
):
    import unipred.listing_sources as ls

    copy, sources = checkout_copy
    monkeypatch.setattr(ls, "_roots", lambda: copy)
    new = copy["unipred.tasks"] / "sounds.py"
    new.write_text("")
    try:
        assert not ls.current(sources)
    finally:
        new.unlink()
    assert ls.current(sources)
    assert not ls.current({**sources, "python": "2.7"})
    assert not ls.current({**sources, "files": {}})
    gone = dict(sources["files"])
    gone["unipred:no_such_file.py"] = gone["unipred:listing.py"]
    assert not ls.current({**sources, "files": gone})


def test_every_listed_name_has_a_one_line_description():
    """A newcomer reads `unipred list` to pick a size: each row says something (a size without
    a docstring is described by what it builds), on one line that ends where a sentence or a
    "..." does, never mid-phrase at a docstring's line break."""
    sections = dict(json.loads(MANIFEST.read_text())["listing"]["sections"])
    from unipred.base.registry import MODELS, load_plugins

    load_plugins()
    for name, text in dict(sections["model sizes"]).items():  # the numbers are what it builds
        p = MODELS.get(name)().predictor
        m = re.search(r"dim (\d+), depth (\d+), (\d+) heads", text)
        if m:
            assert tuple(map(int, m.groups())) == (p.dim, p.depth, p.heads), (name, text)
        assert ("bidirectional" in text) == (p.causal is False), (name, text)
    for title, rows in sections.items():
        for name, text in rows:
            assert text, (title, name)
            assert len(text) <= 110 and "\n" not in text, (title, name, text)
    joint = dict(sections["tokenizers"])["joint"]
    assert joint.endswith("..."), joint
