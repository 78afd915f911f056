"""The core (everything under unipred/) reads from the bottom up and is modality-free.

The layers and the modality libraries are import-linter's job (``lint-imports``, run by
``make lint``; contracts in pyproject.toml): the first tests run it as CI does and prove it
fails on an upward import. What import-linter cannot see stays here: the plugin packages
(``unipred.tasks`` / ``unipred.tokenizers`` live outside unipred/ on disk), imports through the
old flat aliases, and ``if modality == ...`` branches."""

import ast
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import unipred

CORE = Path(unipred.__file__).resolve().parent
ROOT = CORE.parent
PLUGINS = ("unipred.tasks", "unipred.tokenizers")
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names)
    return mods


def _lint(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e .[test])")
def test_the_layer_contracts_hold():
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


@pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e .[test])")
def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    """The same kind of contract on a two-layer package whose low layer imports the high one
    inside a function: lint-imports must fail and name the import."""
    pkg = tmp_path / "layered"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "top.py").write_text("X = 1\n")
    (pkg / "low" / "base.py").write_text("def f():\n    from layered.high.top import X\n")
    (tmp_path / "setup.cfg").write_text(
        textwrap.dedent("""
        [importlinter]
        root_package = layered
        [importlinter:contract:layers]
        name = layers
        type = layers
        layers =
            layered.high
            layered.low
    """)
    )
    r = _lint(tmp_path)
    assert r.returncode != 0 and "layered.low.base -> layered.high.top" in r.stdout, r.stdout


def test_core_imports_no_plugin():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 15 and CORE / "train" / "engine.py" in files
    bad = {}
    for f in files:
        hits = sorted(m for m in imported_modules(f)
                      if any(m == x or m.startswith(x + ".") for x in PLUGINS))  # fmt: skip
        if hits:
            bad[str(f.relative_to(CORE.parent))] = hits
    assert not bad, f"the core imports a plugin package: {bad}"


def test_core_imports_no_old_flat_path():
    """Inside the core every import names a module's real home (unipred.nn.model, not
    unipred.model): the old flat paths are aliases for plugins and users (unipred/_compat.py),
    and an import through an alias would hide an upward import from the layer check."""
    from unipred._compat import MOVED

    bad = {}
    for f in sorted(CORE.rglob("*.py")):
        hits = sorted(m for m in imported_modules(f) if m in MOVED or m.rsplit(".", 1)[0] in MOVED)
        if hits:
            bad[str(f.relative_to(CORE.parent))] = hits
    assert not bad, f"the core imports an old flat path: {bad}"


def test_plugins_tests_and_tools_import_no_old_flat_path():
    """tasks/, tokenizers/, tests, benchmarks, examples and hubconf.py use the new homes too:
    the old paths stay for other people's code (test_old_flat_paths_are_the_moved_modules)."""
    from unipred._compat import MOVED

    files = [f for f in [ROOT / "hubconf.py"] if f.is_file()]  # a checkout's (not a wheel's)
    for d in ("tasks", "tokenizers", "tests", "benchmarks", "examples"):
        files += sorted((ROOT / d).rglob("*.py"))
    bad = {}
    for f in files:
        hits = sorted(m for m in imported_modules(f) if m in MOVED or m.rsplit(".", 1)[0] in MOVED)
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    assert not bad, f"old flat import paths: {bad}"


def test_old_flat_paths_are_the_moved_modules():
    import importlib
    import sys

    from unipred._compat import MOVED

    for old, new in MOVED.items():
        mod = importlib.import_module(old)
        assert mod is sys.modules[new] and mod.__spec__.name == new, old


def test_the_check_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from PIL import Image\n    import unipred.tasks.image.data\n")
    assert {"PIL", "unipred.tasks.image.data"} <= imported_modules(f)


BRANCH = re.compile(
    r"(==|!=|\bin\b)\s*[(\[{]?\s*[\"'](image|audio|video|spectrogram)[\"']"
    r"|\b(Image|Audio|Video|Spectrogram)\w*Tokenizer\b|\bmodality\b\s*(==|!=|\bin\b)"
)


def test_core_has_no_modality_branch():
    """No `if modality == ...` anywhere in the core: modalities plug in, they are not special
    cases."""
    assert BRANCH.search('if cfg.tokenizer == "video":')  # the pattern does catch a branch
    for path in sorted(CORE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not BRANCH.search(code), f"{path}:{i}: modality branch: {line.strip()}"


def test_import_unipred_fills_the_registration_tables():
    """The lower layers read formats defined above them through tables the higher modules
    fill; a fresh ``import unipred`` must fill them all (no lazy upward import does it)."""
    code = (
        "import unipred\n"
        "from unipred.base.contracts import CHECKS\n"
        "from unipred.nn.saving import WEIGHTS_IO\n"
        "from unipred.train import formats\n"
        "print(sorted(CHECKS), sorted(WEIGHTS_IO), sorted(formats.INIT_SOURCES),\n"
        "      sorted(formats.STATE_ADAPTERS), sorted(formats.MODEL_FOLDERS))\n"
        "from unipred.train.checkpoint import apply_init\n"  # ckpt: and pretrain: live there
        "print(sorted(formats.INIT_SOURCES))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=ROOT.parent)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = r.stdout.strip().splitlines()
    assert first == (
        "['check_data', 'check_task', 'check_tokenizer'] ['load', 'push', 'save'] "
        "['official'] ['joint'] ['pretrained']"
    )
    assert second == "['ckpt', 'official', 'pretrain']"
