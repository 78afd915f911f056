"""Exact resume with DataLoader workers and random augmentations, on the shipped image reader
with the small/pretrain recipe's augmentation (random resized crop).

* position: a map-style run stopped mid-epoch and resumed continues at the exact epoch and
  batch, with 0, 1 and 3 workers (before the fix a worker loader replayed epoch 0);
* per-sample randomness: the augmented batches are the same with 0, 1 and 3 workers, and the
  same after a resume, because every random choice is seeded by (seed, epoch, index).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from unipred.base.registry import TASKS
from unipred.data.loader import build_loader
from unipred.train.checkpoint import read_checkpoint
from unipred.train.config import load_config
from unipred.train.engine import fit


def image_folder(root: Path, classes=2, per_class=24, size=14) -> Path:
    """Class folders of small RGB PNGs with structure a crop changes."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a, mode="RGB").save(root / f"c{c}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("img") / "train")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """The same 48 images packed by the project's packer into 12 shards."""
    from unipred.data.cli import main

    out = tmp_path_factory.mktemp("shards") / "train"
    assert main(["pack-images", str(folder), str(out), "--workers", "1",
                 "--max-per-shard", "4"]) == 0  # fmt: skip
    return out


# the small/pretrain recipe (its augmentation: random resized crop 0.5-1.0), made tiny
SMALL = ["trainer.progress_bar=false", "trainer.loggers=[]", "trainer.precision=32-true",
         "model.predictor.dim=32", "model.predictor.depth=1", "model.predictor.heads=2",
         "trainer.global_batch=8", "trainer.collapse_every_n_steps=0", "trainer.threads=1",
         "ema.enabled=true", "ema.decay=0.9", "trainer.log_every_n_steps=1"]  # fmt: skip


def small(folder, run_dir, *over):
    return load_config("small/pretrain", [*SMALL, f"data.root={folder}", f"run_dir={run_dir}",
                                          *over])  # fmt: skip


def digest(x) -> str:
    """A short hash of every tensor in a (nested) batch."""
    h = hashlib.sha1()

    def walk(v):
        if isinstance(v, torch.Tensor):
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for t in v:
                walk(t)
        else:
            h.update(repr(v).encode())

    walk(x)
    return h.hexdigest()[:16]


def batches(folder, workers: int, epochs=(0, 1)) -> list[str]:
    cfg = small(folder, "unused", f"data.num_workers={workers}")
    task = TASKS.get(cfg.task)(cfg)
    ds = task.build_dataset("train")
    loader = build_loader(ds, 8, 1, 0, 1, cfg.seed, True, workers, task.collate_fn("train"))
    out = []
    for e in epochs:
        loader.sampler.set_epoch(e)
        out += [digest(b) for b in loader]
    return out


def test_same_augmented_batches_with_0_1_and_3_workers(folder):
    ref = batches(folder, 0)
    assert len(ref) == 12 and len(set(ref)) == 12
    assert batches(folder, 1) == ref
    assert batches(folder, 3) == ref


def test_every_epoch_draws_new_augmentations(folder):
    """The seed includes the epoch: the same sample is cropped differently in epoch 1."""
    cfg = small(folder, "unused")
    task = TASKS.get(cfg.task)(cfg)
    ds = task.build_dataset("train")
    loader = build_loader(ds, 8, 1, 0, 1, cfg.seed, True, 0, task.collate_fn("train"))
    a, b = loader.dataset[(0, 5)], loader.dataset[(1, 5)]
    assert torch.equal(loader.dataset[(0, 5)][0], a[0])  # a function of (seed, epoch, index)
    assert not torch.equal(a[0], b[0])


def samples(root, workers: int) -> list[str]:
    """Digests of every augmented sample of epoch 0 of a shard stream, sorted."""
    cfg = small(root, "unused", f"data.num_workers={workers}")
    task = TASKS.get(cfg.task)(cfg)
    loader = build_loader(task.build_dataset("train"), 8, 1, 0, 1, cfg.seed, True, workers,
                          task.collate_fn("train"))  # fmt: skip
    loader.dataset.set_epoch(0)
    return sorted(digest(x) for images, _ in loader for x in images)


def test_shards_augment_each_sample_the_same_with_1_2_and_3_workers(shards):
    """Workers read different shards, so the order differs; each sample's crop does not."""
    one = samples(shards, 1)
    assert len(one) == 48 and len(set(one)) == 48
    assert samples(shards, 2) == one
    assert samples(shards, 3) == one


def mixing_collate(items):
    """A collate with a batch-level random draw, as mixup/cutmix make."""
    images, labels = torch.utils.data.default_collate(items)
    return images, labels, torch.rand(1)


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_a_random_collate_draws_the_same_after_a_resume(folder, shards, source):
    """Stopped after 3 of 6 batches and resumed by a new loader (2 workers): the rest of the
    epoch, batch-level random draw included, is the uninterrupted epoch's."""
    root = {"folder": folder, "shards": shards}[source]
    cfg = small(root, "unused")
    task = TASKS.get(cfg.task)(cfg)

    def loader():
        ds = task.build_dataset("train")
        return build_loader(ds, 8, 1, 0, 1, cfg.seed, True, 2, mixing_collate)

    def start(ld):
        ld.sampler.set_epoch(1) if source == "folder" else ld.dataset.set_epoch(1)
        return ld

    full = [digest(b) for b in start(loader())]
    first = start(loader())
    it = iter(first)
    for _ in range(3):
        next(it)
        first.mark_consumed(1)
    state = first.state_dict()
    del it
    second = loader()
    second.load_state_dict(state)
    assert [digest(b) for b in second] == full[3:]


class Batches(L.Callback):
    """The digest of every training batch, by the optimizer step it produces."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step + 1] = (trainer.current_epoch, batch_idx, digest(batch))


class Stop(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("killed")  # stands in for a killed job


def final(run_dir):
    return read_checkpoint(Path(run_dir) / "checkpoints/last.ckpt", require_training_state=True)


def assert_same_state(a: dict, b: dict):
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"]):
        for p, st in sa["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][p][k])), (p, k)


# 48 images / batch 8 = 6 steps per epoch; checkpoint at step 9 = epoch 1 after batch 3
RUN = ["trainer.max_steps=14", "trainer.ckpt_every_n_steps=3"]


# 3 workers and shards in the default suite; 0 and 1 worker (each ~20 s) under -m slow
@pytest.mark.parametrize(
    "source,workers",
    [
        pytest.param("folder", 0, marks=pytest.mark.slow),
        pytest.param("folder", 1, marks=pytest.mark.slow),
        ("folder", 3),
        ("shards", 2),
    ],
)
def test_resume_continues_at_the_exact_batch(folder, shards, tmp_path, source, workers):
    """Stopped one step after the step-9 checkpoint, resume=auto: the batches of the
    uninterrupted run, step for step, and bit-identical weights, EMA and optimizer state."""
    folder = {"folder": folder, "shards": shards}[source]
    over = [*RUN, f"data.num_workers={workers}"]
    full = Batches()
    fit(small(folder, tmp_path / "full", *over), callbacks=[full], show_recipe=False)
    assert sorted(full.seen) == list(range(1, 15))
    first = Batches()
    with pytest.raises(RuntimeError, match="killed"):
        fit(small(folder, tmp_path / "cut", *over), callbacks=[first, Stop(10)], show_recipe=False)
    second = Batches()
    fit(small(folder, tmp_path / "cut", *over, "resume=auto"), callbacks=[second],
        show_recipe=False)  # fmt: skip
    assert sorted(second.seen) == list(range(10, 15))
    assert second.seen[10][:2] == (1, 3)  # epoch 1, batch 3: where the checkpoint was taken
    for step, want in full.seen.items():
        got = second.seen.get(step) or first.seen[step]
        assert got == want, (step, got, want)
    assert_same_state(final(tmp_path / "full"), final(tmp_path / "cut"))


# --------------------------------------------------------------- signals, as schedulers send
SIG_RUN = ["trainer.max_steps=18", "trainer.ckpt_every_n_steps=4", "data.num_workers=2"]


@pytest.fixture(scope="module")
def uninterrupted(folder, shards, tmp_path_factory):
    """The final checkpoint of an uninterrupted run, per data source (made on first use)."""
    done = {}

    def get(source):
        if isinstance(source, tuple):
            get(source[0])
            return done[source]
        if source not in done:
            d = tmp_path_factory.mktemp(f"full_{source}")
            root = {"folder": folder, "shards": shards}[source]
            seen = Batches()
            fit(small(root, d, *SIG_RUN), callbacks=[seen], show_recipe=False)
            done[source] = final(d)
            done[source, "batches"] = seen.seen
        return done[source]

    return get


def signalled_run(root, run_dir, how: str):
    """`unipred fit` in its own session; once step00000008.ckpt exists, stop it ``how``:
    SIGTERM / SIGUSR1 to the main process, SIGTERM to the whole process group (what SLURM and
    most schedulers do: the DataLoader workers get it too), or SIGKILL to the group.
    Returns (exit code, stderr)."""
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unipred.cli", "fit", "small/pretrain", *SMALL, *SIG_RUN,
           f"data.root={root}", f"run_dir={run_dir}"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    t0 = time.time()
    while not (Path(run_dir) / "checkpoints/step00000008.ckpt").exists():
        assert proc.poll() is None and time.time() - t0 < 240, "run ended before the signal"
        time.sleep(0.05)
    if how == "group-SIGTERM":
        os.killpg(proc.pid, signal.SIGTERM)
    elif how == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def check_signalled(root, tmp_path, how, uninterrupted, source):
    d = tmp_path / "run"
    rc, err = signalled_run(root, d, how)
    if how == "SIGKILL":
        assert rc == -signal.SIGKILL
    else:
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 143, err[-3000:]
        assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
        assert lines[-1].startswith("unipred fit: stopped by a signal"), lines[-1]
        stopped = read_checkpoint(d / "checkpoints/last.ckpt")["global_step"]
        assert 8 <= stopped < 18, stopped  # written when the signal came, not at the end
    resumed = Batches()
    trainer = fit(small(root, d, *SIG_RUN, "resume=auto"), callbacks=[resumed],
                  show_recipe=False)  # fmt: skip
    assert trainer.global_step == 18
    full = uninterrupted(source)
    want = uninterrupted((source, "batches"))
    for step, got in resumed.seen.items():
        assert got == want[step], (step, got, want[step])  # the same batch at every step
    assert_same_state(final(d), full)


def test_sigterm_to_the_process_group_writes_last_ckpt_and_resume_is_exact(
    folder, tmp_path, uninterrupted
):
    check_signalled(folder, tmp_path, "group-SIGTERM", uninterrupted, "folder")


@pytest.mark.slow  # one `unipred fit` process and a resumed run per case: ~30 s each
@pytest.mark.parametrize("source", ["folder", "shards"])
@pytest.mark.parametrize("how", ["SIGTERM", "SIGUSR1", "group-SIGTERM", "SIGKILL"])
def test_every_stop_signal_resumes_exactly(folder, shards, tmp_path, how, source, uninterrupted):
    root = {"folder": folder, "shards": shards}[source]
    check_signalled(root, tmp_path, how, uninterrupted, source)


KILL_AT = Path(__file__).parent / "fixtures" / "kill_at.py"


@pytest.mark.slow  # one killed `unipred fit` process and a resumed run per point: ~30 s each
@pytest.mark.parametrize(
    "point,resumes_at",
    [
        ("after_optimizer:7", 6),  # after the epoch-0 end (last.ckpt at step 6, step 4 file)
        ("after_optimizer:10", 8),  # the optimizer stepped; no callback, no checkpoint saw it
        ("after_ema:10", 8),  # the EMA took the step too
        ("after_save:12:step00000012.ckpt", 12),  # step file written; last.ckpt still at 8
        ("after_save:12:last.ckpt", 12),  # step 12 ends epoch 1: resumes at epoch 2's start
        ("after_optimizer:13", 12),  # the first step of epoch 2
    ],
)
def test_sigkill_at_each_point_of_a_step_resumes_exactly(
    folder, tmp_path, uninterrupted, point, resumes_at
):
    """`unipred fit` SIGKILLed with its workers at a controlled point (tests/fixtures/kill_at.py),
    then resume=auto: it resumes from the newest checkpoint and ends bit-identical to the
    uninterrupted run (weights, EMA, optimizer), every resumed batch the same."""
    d = tmp_path / "run"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "KILL_AT": point}
    cmd = [sys.executable, str(KILL_AT), "fit", "small/pretrain", *SMALL, *SIG_RUN,
           f"data.root={folder}", f"run_dir={d}"]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                       start_new_session=True)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    resumed = Batches()
    fit(small(folder, d, *SIG_RUN, "resume=auto"), callbacks=[resumed], show_recipe=False)
    assert min(resumed.seen) == resumes_at + 1, sorted(resumed.seen)
    want = uninterrupted(("folder", "batches"))
    for step, got in resumed.seen.items():
        assert got == want[step], (step, got, want[step])
    assert_same_state(final(d), uninterrupted("folder"))
