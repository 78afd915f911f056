"""Shared test helpers."""

import subprocess
import sys
from pathlib import Path

import pytest


def site_packages() -> Path:
    """This environment's site-packages (the one holding unipred's dependencies)."""
    return next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())


def new_venv(env_dir: Path, pth_line: str) -> Path:
    """A fresh venv at ``env_dir`` without pip of its own whose ``deps.pth`` holds
    ``pth_line`` (a folder to see, or ``import site; site.addsitedir(...)``, which also runs
    that folder's .pth files: an editable unipred's finder among them). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "deps.pth").write_text(pth_line + "\n")
    return py


@pytest.fixture
def throwaway_env(tmp_path):
    """A factory ``make(pth_line, name="env")`` of fresh venvs under tmp_path (``new_venv``)."""

    def make(pth_line: str, name: str = "env") -> Path:
        return new_venv(tmp_path / name, pth_line)

    make.site_packages = site_packages()
    return make


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """unipred's wheel, built once per session from a copy of this checkout, installed (not
    editable) into a throwaway venv that reuses this environment's dependencies. Returns
    ``(python, wheel)``; the venv is ``python.parent.parent``."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy without build/: setuptools reuses a checkout's build/lib, and a stale
    # one (modules since moved or deleted) would land in the wheel
    src, dist = tmp / "src", tmp / "dist"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                  "__pycache__", ".pytest_cache", ".ruff_cache", "examples")  # fmt: skip
    shutil.copytree(root, src, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=src, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    wheel = next(dist.glob("unipred-*.whl"))
    # a plain path entry does not run that folder's .pth files, so the editable unipred of
    # the checkout stays invisible
    py = new_venv(tmp / "env", str(site_packages()))
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return py, wheel
