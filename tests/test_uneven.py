"""Ranks with different numbers of samples stay in step (``unipred.data.uneven``): the
weights make DDP's averaged gradient the gradient of the mean loss over the samples the
ranks actually delivered in that step, and a padding batch adds nothing. 2 gloo processes,
a linear model; the shipped ``joined`` iterator and the engine's ``loss * weight``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "fixtures" / "uneven_grad.py"


def test_weights_make_the_averaged_gradient_the_mean_over_delivered_samples(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "grads"
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(r), "2", port],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]  # fmt: skip
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs[0][-2000:] + errs[1][-2000:]
    r0, r1 = (torch.load(f"{out}-{r}.pt") for r in range(2))
    # rank 0: its sample, then pads; rank 1: 2 + 2 + 1 samples. Steps: 1+2, 0+2, 0+1 samples
    assert r0["marks"] == [(False, 2 * 1 / 3), (True, 0.0), (True, 0.0)]
    assert r1["marks"] == [(False, 2 * 2 / 3), (False, 2.0), (False, 2.0)]
    torch.manual_seed(0)
    ref = torch.nn.Linear(3, 1)
    x, y = r0["x"], r0["y"]
    for step, idx in enumerate([[0, 1, 2], [3, 4], [5]]):  # one process, the step's samples
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref(x[idx]), y[idx]).backward()
        for a, b, p in zip(r0["grads"][step], r1["grads"][step], ref.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-7)
            assert torch.equal(a, b)  # DDP: the same averaged gradient on both ranks
