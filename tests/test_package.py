"""Packaging guards: tokenizers/ and tasks/ install under unipred. and never shadow Hugging Face."""

import importlib.util
import subprocess
import sys
import zipfile

import pytest


def test_wheel_ships_no_top_level_tokenizers_or_tasks(installed_wheel):
    # the session's wheel (tests/conftest.py), built from a copy of this checkout
    names = zipfile.ZipFile(installed_wheel[1]).namelist()
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
