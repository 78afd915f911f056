"""Elastic resume of a shard stream: an epoch interrupted at world size W continues at
W' != W (and another number of DataLoader workers), and over the two runs every sample of
the epoch is trained exactly once.

The fast tests drive the shipped loader and reader of each rank in this process (RANK /
WORLD_SIZE set as a launcher sets them) and join the ranks' positions as the all-gather in
``ShardReader.stream_state`` does under torch.distributed. The slow ones run real gloo
process groups through the engine (4 -> 2 and 2 -> 4 ranks, shards and map-style data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unipred.data import elastic
from unipred.data.loader import build_loader

SCRIPT = Path(__file__).parent / "fixtures" / "elastic_fit.py"


def _images(tmp_path, n) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):  # one class folder per image: the label is the sample's identity
        d = tmp_path / "src" / f"c{i:03d}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / "x.jpg")
    return tmp_path / "src"


def _shards(tmp_path, n, per_shard) -> Path:
    from unipred.data.cli import main

    out = tmp_path / "shards"
    assert main(["pack-images", str(_images(tmp_path, n)), str(out), "--workers", "1",
                 "--max-per-shard", str(per_shard)]) == 0  # fmt: skip
    return out


def _loader(shards, world, rank, workers, batch, monkeypatch):
    from unipred.tasks.image.data import ShardDataset

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    ds = ShardDataset(str(shards), transform=lambda im: 0, seed=3, shuffle_buffer=3)
    return build_loader(ds, batch, world, rank, 1, seed=3, train=True, num_workers=workers)


def _run(shards, world, workers, batch, monkeypatch, steps=None, state=None, epoch=1):
    """Every rank of one run: its labels per step; stopped after ``steps`` (then the joined
    position) or run to the end of the epoch."""
    per_rank, parts = [], []
    for rank in range(world):
        ld = _loader(shards, world, rank, workers, batch, monkeypatch)
        if state is not None:
            ld.load_state_dict(state)
        else:
            ld.dataset.set_epoch(epoch)
        got = []
        for i, (_, labels) in enumerate(ld):
            if steps is not None and i == steps:
                break
            ld.mark_consumed(epoch)
            got.append(labels.tolist())
        per_rank.append(got)
        if steps is not None:
            st = ld.state_dict()
            parts.append(st.pop("stream")["segments"])
            base = st
    n_steps = {len(g) for g in per_rank}
    assert len(n_steps) == 1, f"ranks out of step: {n_steps}"  # DDP needs equal batches
    if steps is None:
        return per_rank, None
    order = [
        u for u, _, _ in _loader(shards, 1, 0, 0, batch, monkeypatch).dataset.epoch_segments(epoch)
    ]
    base["stream"] = {"epoch": epoch, "segments": elastic.merge(parts, order)}
    base["samples_global"] = steps * batch * world
    return per_rank, json.loads(json.dumps(base))  # as a checkpoint stores it


@pytest.mark.parametrize(("first", "second"), [((4, 2, 2), (2, 3, 4)), ((2, 0, 4), (4, 1, 2))])
def test_an_epoch_resumed_on_another_world_size_sees_every_sample_once(
    tmp_path, monkeypatch, first, second
):
    """(world, workers, per-device batch): the global batch stays 8; 48 samples, 6 steps;
    3 steps at the first size, the rest at the second."""
    shards = _shards(tmp_path, 48, 4)
    (w1, nw1, b1), (w2, nw2, b2) = first, second
    part1, state = _run(shards, w1, nw1, b1, monkeypatch, steps=3)
    assert state["samples_global"] == 24
    left = elastic.total([tuple(s) for s in state["stream"]["segments"]])
    assert left == 24
    part2, _ = _run(shards, w2, nw2, b2, monkeypatch, state=state)
    assert len(part2[0]) == 3  # the rest of the epoch: 3 global steps of 8
    seen = [k for rank in part1 + part2 for batch in rank for k in batch]
    assert sorted(seen) == list(range(48)), "repeated or lost samples"


def test_the_epoch_order_depends_on_seed_and_epoch_only(tmp_path, monkeypatch):
    """The global sample order (shards, and each shard's order) is the same whatever the
    world size: an evaluation-style read of the plan's segments gives one sequence."""
    shards = _shards(tmp_path, 24, 4)
    a = _loader(shards, 4, 1, 2, 2, monkeypatch).dataset.epoch_segments(5)
    b = _loader(shards, 2, 0, 0, 4, monkeypatch).dataset.epoch_segments(5)
    c = _loader(shards, 2, 0, 0, 4, monkeypatch).dataset.epoch_segments(6)
    assert a == b and a != c
    # and every sample of the epoch is trained once at either size
    for world, workers, batch in ((4, 2, 2), (1, 3, 8)):
        per_rank, _ = _run(shards, world, workers, batch, monkeypatch, epoch=5)
        seen = [k for rank in per_rank for batch in rank for k in batch]
        assert sorted(seen) == list(range(24))


def test_assign_splits_whole_batches_over_ranks_and_workers():
    segs = [("a", 0, 5), ("b", 0, 7), ("c", 2, 6)]  # 16 samples
    got = [elastic.assign(segs, r, 2, w, 3, 2, True) for r in range(2) for w in range(3)]
    # 16 samples // 2 ranks // batch 2 = 4 batches a rank, dealt 2 + 1 + 1 to its workers
    assert [q for _, q, _, _ in got] == [4, 2, 2, 4, 2, 2]
    covered = [(u, i) for segs_, _, _, _ in got for u, a, b in segs_ for i in range(a, b)]
    assert len(covered) == len(set(covered)) == 16
    assert elastic.consumed_per_worker(7, 3, {}) == [3, 2, 2]
    assert elastic.consumed_per_worker(7, 3, {1: 1}) == [3, 1, 3]  # worker 1 ended early


def _fit(args, env_extra, timeout=400):
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _steps(run_dir) -> dict[int, list[int]]:
    """step -> the labels of that step's global batch, joined over ranks and runs (a later
    run's record of a step replaces an earlier one: the earlier was not checkpointed)."""
    out: dict[int, list[int]] = {}
    for path in sorted(Path(run_dir).glob("keys-*.json"), key=lambda p: p.stat().st_mtime):
        rec = json.loads(path.read_text())
        for step, labels in rec["steps"].items():
            out.setdefault((rec["run"], int(step)), []).extend(labels)
    merged: dict[int, list[int]] = {}
    for (_run, step), labels in sorted(out.items()):
        merged[step] = labels
    return merged


@pytest.mark.slow  # 4 + 2 gloo processes with workers on 2 cores: about a minute or two
@pytest.mark.parametrize(("data", "first", "second"),
                         [("shards", "4:1", "2:2"), ("shards", "2:2", "4:0"),
                          ("folders", "2:0", "4:1")])  # fmt: skip
def test_gloo_run_killed_at_one_world_size_resumes_at_another(tmp_path, data, first, second):
    """A real DDP run (gloo, CPU) is killed after the step-2 checkpoint of a 6-step epoch and
    resumed with resume=auto on another number of ranks and workers: every sample once, the
    optimizer and schedule continue, and the recipe guard says why it lets the run go on."""
    n = 48
    root = _shards(tmp_path, n, 4) if data == "shards" else _images(tmp_path, n)
    run = tmp_path / "run"
    (w1, nw1), (w2, nw2) = (map(int, s.split(":")) for s in (first, second))
    p1 = _fit([str(root), str(run), str(w1), str(nw1), "1", "3"], {})
    assert p1.returncode != 0 and "killed at step 3" in p1.stderr, p1.stderr[-3000:]
    p2 = _fit([str(root), str(run), str(w2), str(nw2), "2", "0"], {})
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert f"resuming on {w2} devices (saved on {w1}) with the same global batch 8" in p2.stdout
    steps = _steps(run)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    seen = [k for s in range(1, 7) for k in steps[s]]
    assert sorted(seen) == list(range(n)), "repeated or lost samples"
    start = json.loads((run / "start-2.json").read_text())
    assert (
        start["scheduler_step"] == 2 and start["optimizer_state"] > 0 and start["ema_updates"] == 2
    )


def test_the_resume_guard_line_names_both_world_sizes():
    from unipred.train.engine import BatchPlan, world_size_line

    plan = BatchPlan(global_batch=8, world_size=2, per_device_batch=4, accumulate_grad_batches=1,
                     lr=1e-3, head_lr=None)  # fmt: skip
    assert world_size_line({"world_size": 4}, plan) == (
        "resuming on 2 devices (saved on 4) with the same global batch 8 (4 per device x 1 "
        "accumulation): the recipe is unchanged")  # fmt: skip
    assert world_size_line({"world_size": 2}, plan) == ""
    assert world_size_line({}, plan) == ""
