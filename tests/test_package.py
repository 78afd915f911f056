"""Packaging guards: tokenizers/ and tasks/ install under unipred. and never shadow Hugging Face."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


def test_wheel_ships_no_top_level_tokenizers_or_tasks(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("unipred-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "tokenizers" not in tops and "tasks" not in tops
    assert "unipred/tokenizers/image.py" in names and "unipred/tasks/__init__.py" in names
    assert importlib.util.find_spec("unipred.tokenizers") is not None


def test_hugging_face_tokenizers_still_imports_from_site_packages(tmp_path):
    if importlib.util.find_spec("tokenizers") is None:
        pytest.skip("Hugging Face tokenizers is not installed")
    code = (
        "import tokenizers, unipred.tokenizers.image, unipred.base.registry as r;"
        "print(tokenizers.__file__); print(hasattr(tokenizers, 'Tokenizer')); print(r.TOKENIZERS.names())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    path, has_tok, names = out.stdout.splitlines()
    assert "site-packages" in path and has_tok == "True" and "image" in names


def test_public_api():
    import unipred

    for name in ("NEPA", "Predictor", "PredictorConfig", "next_embedding_loss", "Tokens"):
        assert hasattr(unipred, name)
