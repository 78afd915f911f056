"""DDP on 2 CPU processes (gloo) reaches the same weights as 1 process with the same global
batch. The 2-process run is a subprocess (`python -m unipred.cli fit ...`), so Lightning's
launcher re-runs that command, not pytest."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from unipred.train.checkpoint import read_checkpoint
from unipred.train.config import load_config
from unipred.train.engine import fit

TINY = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"
COMMON = [
    "trainer.progress_bar=false",
    "trainer.loggers=[]",
    "data.image_size=16",
    "data.train_samples=24",
    "data.val_samples=4",
    "trainer.global_batch=8",
    "trainer.accelerator=cpu",
    "model.predictor.rope_rescale=0",
    "ema.decay=0.9",
]


def _weights(run_dir):
    ck = read_checkpoint(Path(run_dir) / "checkpoints/last.ckpt", require_training_state=True)
    return ck["global_step"], ck["state_dict"], ck["ema_state_dict"]


def test_two_processes_equal_one(tmp_path):
    one = tmp_path / "one"
    fit(load_config(TINY, [*COMMON, f"run_dir={one}"]))

    two = tmp_path / "two"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "unipred.cli",
        "fit",
        str(TINY),
        *COMMON,
        f"run_dir={two}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size              2" in proc.stdout and "per_device_batch        4" in proc.stdout

    s1, w1, e1 = _weights(one)
    s2, w2, e2 = _weights(two)
    assert s1 == s2 == 3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in e1:
        torch.testing.assert_close(e2[k], e1[k], rtol=1e-4, atol=1e-5, msg=k)
    # and the weights did move, so the comparison means something
    assert not torch.equal(w1["model.cls_token"], _initial_cls_token())


def _initial_cls_token():
    import lightning as L

    from unipred.train.engine import LitTask

    L.seed_everything(1337, workers=True, verbose=False)
    lit = LitTask(load_config(TINY, COMMON))
    return lit.model.cls_token.detach()
