"""Shared test helpers."""

import subprocess
import sys
from pathlib import Path

import pytest


def site_packages() -> Path:
    """This environment's site-packages (the one holding unipred's dependencies)."""
    return next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())


@pytest.fixture
def throwaway_env(tmp_path):
    """A factory for a fresh venv without pip of its own whose ``deps.pth`` holds the given
    line (a folder to see, or ``import site; site.addsitedir(...)``, which also runs that
    folder's .pth files: an editable unipred's finder among them). Returns its python."""

    def make(pth_line: str, name: str = "env") -> Path:
        env_dir = tmp_path / name
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
        py = env_dir / "bin" / "python"
        purelib = subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        Path(purelib, "deps.pth").write_text(pth_line + "\n")
        return py

    make.site_packages = site_packages()
    return make
