"""The core (everything under unipred/) is modality-free: checked on the import graph of every
module, function-level imports included, not on a hand-picked list of files."""

import ast
import re
from pathlib import Path

import unipred

CORE = Path(unipred.__file__).resolve().parent
FORBIDDEN = ("PIL", "torchvision", "torchaudio", "torchcodec", "timm", "matplotlib", "skvideo",
             "unipred.tasks", "unipred.tokenizers")  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names)
    return mods


def test_core_imports_no_modality_library_or_plugin():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 15 and CORE / "train" / "engine.py" in files
    bad = {}
    for f in files:
        hits = sorted(m for m in imported_modules(f) if m == m.split(".")[0] and m in FORBIDDEN
                      or any(m == x or m.startswith(x + ".") for x in FORBIDDEN))  # fmt: skip
        if hits:
            bad[str(f.relative_to(CORE.parent))] = hits
    assert not bad, f"the core imports modality code: {bad}"


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
