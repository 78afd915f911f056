"""``unipred list`` without its cache: an installed release reads its own plugins'
registrations from ``unipred/builtin_plugins.json`` instead of importing them (and torch), so
that file must say exactly what importing them registers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from unipred.listing import MANIFEST, _editable_install


def _run(args, tmp_path, **env):
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONSAFEPATH": "1", **env},
    )  # fmt: skip


def test_the_manifest_says_what_the_built_in_plugins_register(tmp_path):
    p = _run(["-m", "unipred.listing", "--print-builtin"], tmp_path)  # a fresh process
    assert p.returncode == 0, p.stderr[-2000:]
    live = json.loads(p.stdout)
    shipped = json.loads(MANIFEST.read_text())["listing"]
    assert shipped == live, (
        "unipred/builtin_plugins.json is out of date with what the built-in plugins register: "
        "run `python -m unipred.listing --write-manifest` and commit it"
    )


def test_a_cold_list_from_the_manifest_imports_no_torch_and_lists_the_same(tmp_path):
    assert _editable_install()  # this checkout: by default it imports (its files change)
    got = {}
    for choice in ("1", "0"):
        cache = str(tmp_path / f"cache{choice}")  # empty: no cached listing
        p = _run(["-X", "importtime", "-m", "unipred", "list"], tmp_path,
                 UNIPRED_CACHE=cache, UNIPRED_PLUGIN_MANIFEST=choice)  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
        got[choice] = (bool(re.search(r"\|\s+torch$", p.stderr, re.M)), p.stdout)
    assert got["1"] == (False, got["0"][1]) and got["0"][0]  # imported torch only when told
    assert "tokenizers:" in got["1"][1] and "  image_pretrain " in got["1"][1]
