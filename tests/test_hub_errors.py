"""Hub loading and ``unipred export --push`` without a Hub: one line with the right reason
(a malformed repo id, offline mode, no network), exit 2 for the command, never a traceback.
"No network" is a Hub endpoint on a closed local port (connection refused at once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path, offline: bool) -> dict:
    return {**os.environ, "PYTHONSAFEPATH": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_CACHE": str(tmp_path / "hfcache"), "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "hf_test_token_not_real"}  # fmt: skip


LOAD = """
from unipred import NEPA
for rid in ("someone/absent", "bad id!!"):
    try:
        NEPA.from_pretrained(rid)
    except Exception as e:
        print(type(e).__name__ + ": " + str(e))
"""


@pytest.mark.parametrize("offline", [True, False])
def test_loading_a_repo_id_names_the_reason(tmp_path, offline):
    out = subprocess.run([sys.executable, "-c", LOAD], env=_env(tmp_path, offline), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    absent, bad = out.stdout.strip().splitlines()
    assert absent.startswith("PretrainedError: someone/absent: ")
    if offline:
        assert "offline mode" in absent and "no network" not in absent
    else:
        assert "could not be reached (no network?)" in absent and "offline" not in absent
    assert bad.startswith("PretrainedError: bad id!!: not a valid Hugging Face repo id")


@pytest.mark.parametrize("offline", [True, False])
def test_export_push_without_a_hub_is_one_line_and_exit_2(tmp_path, offline):
    from unipred.nn.model import NEPA
    from unipred.train.checkpoint import atomic_torch_save
    from unipred.train.config import load_config, to_dict

    cfg = load_config(ROOT / "configs/debug/image_nepa_tiny.yaml", check_paths=False)
    model = NEPA.from_name("nepa_debug")
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": sd, "unipred_config": to_dict(cfg)}, ckpt)
    cmd = [sys.executable, "-m", "unipred.cli", "export", str(ckpt), str(tmp_path / "out"),
           "--push", "someone/nepa"]  # fmt: skip
    out = subprocess.run(cmd, env=_env(tmp_path, offline), cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "was written, but pushing it to someone/nepa failed" in lines[0]
    assert ("offline mode" in lines[0]) == offline
    assert ("no network" in lines[0]) == (not offline)
    assert (tmp_path / "out" / "model.safetensors").is_file()
