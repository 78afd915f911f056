"""The EMA is validated during ``trainer.strategy=fsdp2`` training (``val_ema/``), by swapping
each rank's local slices of the weights with those of the sharded EMA and back.

A real gloo run on CPU ranks (subprocess, as a user runs the engine): every validation
reports ``val/`` and ``val_ema/``; each rank's slices of the training weights are bit for bit
the same after validation as before; and the last ``val_ema/loss`` equals the validation loss
of an unsharded model on one process loaded with the EMA weights of the run's checkpoint
(what ``unipred export --ema`` exports), while it differs from ``val/loss``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "fixtures" / "fsdp_val.py"


def _images(root: Path, n: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / f"c{i:03d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            root / f"c{i:03d}" / "x.jpg"
        )
    return root


@pytest.mark.parametrize(
    "world",
    [1, pytest.param(2, marks=pytest.mark.slow)],  # 2 gloo ranks: a minute or more
)
def test_fsdp2_validates_the_ema_by_swapping_slices_and_restores_the_weights(tmp_path, world):
    train, val = _images(tmp_path / "src", 16, 0), _images(tmp_path / "val", 8, 1)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(SCRIPT), str(train), str(val), str(run), str(world)],
                       env=env, capture_output=True, text=True, timeout=500)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "validated weights are the raw ones" not in p.stdout + p.stderr  # the old warning
    vals = json.loads((run / "val.json").read_text())
    assert [v["step"] for v in vals] == [2, 4]
    assert all(v["unchanged"] for v in vals), vals  # training slices restored bit for bit
    last = vals[-1]
    assert abs(last["val_ema/loss"] - last["val/loss"]) > 1e-4  # the EMA is not the weights

    # an unsharded model on one process, loaded with the checkpoint's EMA weights
    from unipred.cli import main
    from unipred.nn.model import NEPA
    from unipred.train.checkpoint import read_checkpoint
    from unipred.train.config import load_config
    from unipred.train.engine import evaluate

    ckpt = run / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(ckpt)
    assert int(saved["ema_n_averaged"]) == 4 and saved["global_step"] == 4
    assert main(["export", str(ckpt), str(tmp_path / "exported"), "--ema"]) == 0
    exported = NEPA.from_pretrained(tmp_path / "exported").state_dict()
    assert all(torch.equal(v, saved["ema_state_dict"][k]) for k, v in exported.items())
    cfg = load_config(None, [
        "task=image_pretrain", "model.name=nepa_debug", "model.predictor.depth=2",
        f"data.root={train}", f"data.val_root={val}", "data.aug.img_size=16",
        "trainer.global_batch=8", "model.predictor.drop_path=0",
        "model.predictor.rope_rescale=0", "trainer.progress_bar=false", "trainer.loggers=[]",
        "trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0",
        f"run_dir={tmp_path / 'eval'}", f"ckpt={ckpt}", "trainer.threads=1"])  # fmt: skip
    res = evaluate(cfg)
    assert res["val_ema/loss"] == pytest.approx(last["val_ema/loss"], rel=1e-5, abs=1e-6)
    assert res["val/loss"] == pytest.approx(last["val/loss"], rel=1e-5, abs=1e-6)
