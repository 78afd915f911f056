"""Fault injection: checkpoints that carry code, writes killed or failing mid-way, preemption
signals. Each test injects the fault into the component the project ships (the real loaders,
the real checkpoint writer, a real `unipred fit` process) and checks that nothing is lost.
docs/faults.md lists the faults and what each test measures."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import unipred.train.checkpoint as ckpt_mod
from unipred.train.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    apply_init,
    atomic_torch_save,
    find_resume_checkpoint,
    read_checkpoint,
)
from unipred.train.config import load_config
from unipred.train.engine import LitTask, fit

TINY = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"
BASE = ["trainer.progress_bar=false", "trainer.loggers=[]", "data.image_size=16",
        "data.train_samples=32", "data.val_samples=0", "trainer.global_batch=8",
        "model.predictor.rope_rescale=0", "trainer.collapse_every_n_steps=0"]  # fmt: skip


def tiny(run_dir, *over):
    return load_config(TINY, [*BASE, f"run_dir={run_dir}", *over])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny pretraining run (4 steps, EMA on): its folder."""
    d = tmp_path_factory.mktemp("run")
    fit(tiny(d, "trainer.ckpt_every_n_steps=2", "ema.decay=0.5"))
    return d


# ------------------------------------------------------------------------- safe loading
class Payload:
    """Unpickling this runs code: it creates the file ``target``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('owned')",))


def plant(path, target, legacy=False):
    """A checkpoint that looks like ours but carries a payload next to real weights."""
    last = path.parent / "last.ckpt"
    good = torch.load(last, weights_only=True) if last.exists() else {}
    obj = {**good, "state_dict": good.get("state_dict", {}), "extra": Payload(target)}
    if legacy:  # the old non-zip torch format: a bare pickle stream
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return path


def test_our_checkpoints_load_weights_only(run):
    """Every file our runs write loads with torch's weights-only unpickler, allow-list empty."""
    assert ckpt_mod.SAFE_GLOBALS == []
    files = sorted((run / "checkpoints").glob("*.ckpt"))
    # and nothing else: Lightning's default ModelCheckpoint wrote a second full-size copy
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*.ckpt")) == [
        "checkpoints/last.ckpt",
        "checkpoints/step00000002.ckpt",
        "checkpoints/step00000004.ckpt",
    ]
    for p in files:
        ck = torch.load(p, map_location="cpu", weights_only=True)
        assert {"state_dict", "ema_state_dict", "rng", "unipred_config", "loops"} <= set(ck)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_checkpoint_carrying_code_is_refused_everywhere(run, tmp_path, legacy, capsys):
    target = tmp_path / "owned.txt"
    bad = plant(tmp_path / "bad.ckpt", target, legacy)
    # (sanity: the payload is real; a plain pickle load would run it)
    if not legacy:
        torch.load(bad, weights_only=False)
        assert target.exists()
        target.unlink()
    cls_model = LitTask(tiny(tmp_path, "task=debug_image_classify")).model
    model = LitTask(tiny(tmp_path)).model
    for load in (
        lambda: read_checkpoint(bad),
        lambda: apply_init(model, f"ckpt:{bad}"),
        lambda: apply_init(cls_model, f"pretrain:{bad}"),
        lambda: apply_init(cls_model, f"pretrain:{bad}:ema"),
        lambda: ckpt_mod.AtomicCheckpointIO().load_checkpoint(bad),  # Lightning's restore
    ):
        # both formats: classed unsafe from the pickle's opcodes (it names `exec`), in
        # unipred's words, never with torch's advice to turn weights_only off; nothing run
        with pytest.raises(UnsafeCheckpointError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(bad)) and "refused" in msg
        assert "holds Python objects that could run code; unipred loads tensors only" in msg
        assert "exec" in msg and "weights_only" not in msg
    from unipred.cli import main

    # eval ckpt=PATH: one line on stderr naming the file, exit code 2
    args = ["eval", str(TINY), f"ckpt={bad}", f"run_dir={tmp_path / 'ev'}", *BASE[:3]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "refused" in err
    # hub: an official-style folder whose pytorch_model.bin is the payload
    from unipred.weights.hub import read_state_dict

    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "pytorch_model.bin").write_bytes(bad.read_bytes())
    with pytest.raises(CheckpointError, match="pytorch_model.bin: .*refused"):
        read_state_dict(hub)
    # visualize --ckpt
    from unipred.tasks.image.visualize import main as vis_main

    assert vis_main(["--ckpt", str(bad), "--out", str(tmp_path / "vis")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err
    assert not target.exists()  # the payload never ran


def test_resume_auto_never_starts_over_nor_overwrites_a_planted_last_ckpt(run, tmp_path):
    """A planted newest last.ckpt: resume=auto falls back to the newest loadable checkpoint
    (saying which), sets the planted file aside and never overwrites it; nothing runs."""
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run, d)
    target = tmp_path / "owned.txt"
    planted = plant(d / "checkpoints" / "last.ckpt", target)
    evidence = planted.read_bytes()
    with pytest.warns(UserWarning) as warned:
        trainer = fit(
            tiny(
                d,
                "resume=auto",
                "trainer.ckpt_every_n_steps=2",
                "ema.decay=0.5",
                "trainer.max_epochs=2",
                "resume_allow_changes=true",
            )
        )
    said = " | ".join(str(w.message) for w in warned)
    assert "last.ckpt: refused" in said and "kept as last.ckpt.unsafe" in said
    assert "resuming from" in said and "step00000004.ckpt (step 4)" in said
    assert trainer.global_step == 8  # continued from step 4, not started over
    assert (d / "checkpoints/last.ckpt.unsafe").read_bytes() == evidence
    assert read_checkpoint(d / "checkpoints/last.ckpt")["global_step"] == 8
    assert not target.exists()


def test_resume_auto_stops_in_one_line_when_nothing_can_be_resumed(run, tmp_path, capsys):
    from unipred.cli import main

    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    target = tmp_path / "owned.txt"
    planted = plant(d / "checkpoints" / "last.ckpt", target)
    evidence = planted.read_bytes()
    args = ["fit", str(TINY), *BASE, f"run_dir={d}", "resume=auto"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to start over" in err and "last.ckpt" in err
    assert planted.read_bytes() == evidence and not target.exists()
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["last.ckpt"]


# --------------------------------------------------------------------- crash-safe writes
def test_enospc_mid_write_keeps_the_last_checkpoint_and_resume_works(tmp_path, monkeypatch):
    """The disk fills up in the middle of the step-4 checkpoint of a real run."""
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(getattr(f, "name", ""))
        if len(calls) == 3:  # step 2: step file + last.ckpt; step 4: the step file fails
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(ckpt_mod.DiskFullError) as e:
        fit(tiny(tmp_path, "trainer.ckpt_every_n_steps=2", "trainer.max_epochs=1"))
    assert str(e.value) == (
        f"no space left on device at {tmp_path / 'checkpoints/step00000004.ckpt'}; the "
        "previous checkpoint last.ckpt (step 2) is intact"
    )
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step00000002.ckpt"]
    assert read_checkpoint(folder / "last.ckpt", require_training_state=True)["global_step"] == 2
    trainer = fit(tiny(tmp_path, "trainer.ckpt_every_n_steps=2", "trainer.max_epochs=1",
                       "resume=auto"))  # fmt: skip
    assert trainer.global_step == 4


KILLER = r"""
import json, os, signal, sys, torch
from unipred import checkpoint as c
path = sys.argv[1]
obj = torch.load(path, weights_only=True)
old_step = obj["global_step"]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_save, real_replace = torch.save, os.replace

class Dying:  # a file object that dies once `at` bytes have been written
    def __init__(self, f, at): self.f, self.at, self.n = f, at, 0
    def write(self, b):
        b = bytes(b)
        if self.n + len(b) >= self.at:
            self.f.write(b[: self.at - self.n]); self.f.flush(); die()
        self.n += len(b); return self.f.write(b)
    def __getattr__(self, k): return getattr(self.f, k)

results = []
for phase, at in json.loads(sys.argv[2]):
    pid = os.fork()
    if pid == 0:  # the writer: dies inside the write of the checkpoint of step 999
        if phase == "write":
            torch.save = lambda o, f, *a, **k: real_save(o, Dying(f, at), *a, **k)
        elif phase == "fsync":
            os.fsync = lambda fd: die()
        elif phase == "rename":
            os.replace = lambda a, b: die()
        elif phase == "after_rename":
            os.replace = lambda a, b: (real_replace(a, b), die())
        c.atomic_torch_save({**obj, "global_step": 999}, path)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    step = int(c.read_checkpoint(path, require_training_state=True)["global_step"])
    leftovers = [p for p in os.listdir(os.path.dirname(path)) if p.startswith(".")]
    results.append([phase, at, killed, step, len(leftovers)])
    if step == 999:  # put the old checkpoint back for the next fault
        c.atomic_torch_save({**obj, "global_step": old_step}, path)
print(json.dumps(results))
"""

# every point of a write: before the first byte, inside the header, inside the tensors, after
# the last byte (before fsync), after fsync (before the rename), after the rename
KILL_POINTS = [["write", 0], ["write", 64], ["write", 5_000], ["write", 500_000],
               ["write", 1_700_000], ["fsync", 0], ["rename", 0], ["after_rename", 0]]  # fmt: skip


@pytest.mark.slow  # one writer process forked per fault point, then a resumed run: ~15 s
def test_sigkill_at_any_point_of_a_checkpoint_write(run, tmp_path):
    """A process SIGKILLed inside the write of last.ckpt: the file is the old or the new
    checkpoint (never a torn one), dead writers' temporaries are cleaned up by the next save,
    and resume=auto works."""
    import json
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run, d)
    last = d / "checkpoints" / "last.ckpt"
    before = read_checkpoint(last, require_training_state=True)["global_step"]
    size = last.stat().st_size
    assert size > KILL_POINTS[4][1]  # the last write point is inside the file's bytes
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(last), json.dumps(KILL_POINTS)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(KILL_POINTS)
    for phase, at, killed, step, _ in results:
        assert killed, (phase, at)
        assert step == (999 if phase == "after_rename" else before), (phase, at)
    # each dead writer left a temporary; the save after it removed the previous one's
    assert all(n <= 1 for *_, n in results)
    atomic_torch_save(read_checkpoint(last), last)
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]
    assert find_resume_checkpoint(d) == last
    trainer = fit(tiny(d, "resume=auto", "trainer.max_epochs=2", "ema.decay=0.5"))
    assert trainer.global_step == 8


# -------------------------------------------------------------------------- preemption
PRE = ["trainer.max_steps=60", "data.train_samples=64", "trainer.ckpt_every_n_steps=5",
       "ema.decay=0.9", "data.num_workers=2"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    fit(tiny(d, *PRE))
    return read_checkpoint(d / "checkpoints/last.ckpt", require_training_state=True)


@pytest.mark.slow  # a `unipred fit` process plus a resumed run: ~25 s on a loaded 2-core box
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_writes_a_checkpoint_and_resume_is_exact(tmp_path, sig, uninterrupted):
    d = tmp_path / "run"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "unipred.cli", "fit", str(TINY), *BASE, *PRE, f"run_dir={d}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    t0 = time.time()
    while not (d / "checkpoints/step00000005.ckpt").exists():
        assert proc.poll() is None and time.time() - t0 < 240, "run ended before the signal"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by a signal" in err and "Traceback" not in err
    ck = read_checkpoint(d / "checkpoints/last.ckpt", require_training_state=True)
    stopped = ck["global_step"]
    assert 5 <= stopped < 60, stopped  # written when the signal came, not at the end
    trainer = fit(tiny(d, *PRE, "resume=auto"))
    assert trainer.global_step == 60
    done = read_checkpoint(d / "checkpoints/last.ckpt", require_training_state=True)
    for key in ("state_dict", "ema_state_dict"):
        for k, v in uninterrupted[key].items():
            assert torch.equal(done[key][k], v), (key, k)
