"""A multi-node rehearsal on one host: two "nodes" of two gloo processes each, started by
``torchrun --nnodes 2 --rdzv-endpoint 127.0.0.1:PORT`` exactly as on a cluster (one
torchrun per node; run as ``python -m torch.distributed.run``, which is torchrun), train the same weights as one process with the same global batch. Then a
node is killed mid-run, the other one dies with it (as a scheduler ends the job), and the job
resumes with resume=auto on one node of two processes, to the weights of the uninterrupted
one-process run. Everything talks over 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unipred.train.checkpoint import read_checkpoint
from unipred.train.config import load_config
from unipred.train.engine import fit

TINY = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"
COMMON = ["trainer.progress_bar=false", "trainer.loggers=[]", "data.image_size=16",
          "data.val_samples=4", "trainer.global_batch=8", "trainer.accelerator=cpu",
          "model.predictor.rope_rescale=0", "ema.decay=0.9", "trainer.ckpt_every_n_steps=2",
          "trainer.collapse_every_n_steps=0", "trainer.threads=1"]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(run_dir, nodes: int, port: int, extra=(), log=None) -> subprocess.Popen:
    """One node's torchrun (2 processes), in a session of its own so it can be killed whole."""
    # torchrun itself (its console script may point at another environment's python)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=rehearsal-{port}",
           "--local-addr=127.0.0.1", "-m", "unipred.cli", "fit", str(TINY), *COMMON, *extra,
           f"run_dir={run_dir}", "trainer.devices=2", f"trainer.num_nodes={nodes}",
           "trainer.strategy=ddp", "resume=auto"]  # fmt: skip
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}  # fmt: skip
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so
    killing its process group leaves them running)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun and every process it started (a lost machine)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _weights(run_dir):
    ck = read_checkpoint(Path(run_dir) / "checkpoints/last.ckpt", require_training_state=True)
    return ck["global_step"], ck["state_dict"], ck["ema_state_dict"]


def _same(a, b):
    (s1, w1, e1), (s2, w2, e2) = a, b
    assert s1 == s2
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in e1:
        torch.testing.assert_close(e2[k], e1[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow  # 2 torchrun agents + 4 training processes on 2 cores: a minute or two
def test_two_torchrun_nodes_equal_one_process_and_resume_on_one_node(tmp_path):
    # 1. two nodes x two processes, 3 steps of a global batch of 8 == one process
    one = tmp_path / "one"
    fit(load_config(TINY, [*COMMON, "data.train_samples=24", f"run_dir={one}"]))
    two = tmp_path / "two"
    two.mkdir()
    port = _port()
    nodes = [_node(two, 2, port, ["data.train_samples=24"], tmp_path / f"n{i}.log") for i in (0, 1)]
    for p in nodes:
        assert p.wait(timeout=300) == 0, (tmp_path / "n0.log").read_text()[-3000:]
    log = (tmp_path / "n0.log").read_text() + (tmp_path / "n1.log").read_text()
    assert "world_size              4" in log and "per_device_batch        2" in log
    _same(_weights(one), _weights(two))

    # 2. 12 steps; node 1 is killed after the step-4 checkpoint, node 0 is ended with it
    ref = tmp_path / "ref"
    fit(load_config(TINY, [*COMMON, "data.train_samples=96", f"run_dir={ref}"]))
    job = tmp_path / "job"
    job.mkdir()
    port = _port()
    extra = ["data.train_samples=96"]
    nodes = [_node(job, 2, port, extra, tmp_path / f"j{i}.log") for i in (0, 1)]
    ckpt = job / "checkpoints" / "step00000004.ckpt"
    t0 = time.monotonic()
    while not ckpt.exists() and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    assert ckpt.exists(), (tmp_path / "j0.log").read_text()[-3000:]
    _kill(nodes[1])
    try:
        nodes[0].wait(timeout=60)  # gloo notices the lost peers
    except subprocess.TimeoutExpired:
        pass
    _kill(nodes[0])
    saved = read_checkpoint(job / "checkpoints" / "last.ckpt", require_training_state=True)
    assert 4 <= saved["global_step"] < 12, "the run ended before the kill"
    # 3. requeued on one node: resume=auto, the same global batch on 2 processes
    node = _node(job, 1, _port(), extra, tmp_path / "r0.log")
    assert node.wait(timeout=300) == 0, (tmp_path / "r0.log").read_text()[-3000:]
    log = (tmp_path / "r0.log").read_text()
    assert "resuming on 2 devices (saved on 4) with the same global batch 8" in log
    _same(_weights(ref), _weights(job))
