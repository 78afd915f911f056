"""Shards streamed over HTTP from a real server on 127.0.0.1 that fails: stopped for seconds
in the middle of a shard, a connection reset, a truncated shard, a 404, a slow
(bandwidth-limited) shard. The shards come from the shipped packer, the reading is the shipped
reader inside a real training run; the server is Python's http.server with Range support and
the faults injected. No traffic leaves 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from unipred.data.remote import NetworkPolicy, ShardGone, open_shard
from unipred.train.config import load_config
from unipred.train.engine import fit

N, PER_SHARD = 40, 4  # 10 shards


SERVER = Path(__file__).parent / "fixtures" / "faulty_http.py"


class FaultyShards:
    """The fault-injecting HTTP server of ``fixtures/faulty_http.py`` over ``root``, in a
    process of its own (a thread would hand its listening socket to every forked DataLoader
    worker, and the port would stay taken while the server is meant to be down)."""

    def __init__(self, root: Path, faults: dict):
        tmp = root.parent
        self.log, port_file = tmp / "requests.log", tmp / f"port-{time.monotonic_ns()}"
        self.proc = subprocess.Popen([sys.executable, str(SERVER), str(root), str(port_file),
                                      str(self.log), json.dumps(faults)])  # fmt: skip
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    @property
    def requests(self) -> list[tuple[str, str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [tuple(line.split("\t", 1)) for line in lines]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self):
        self.proc.kill()
        self.proc.wait()


def _pack(tmp_path) -> Path:
    from unipred.data.cli import main

    rng = np.random.default_rng(0)
    for i in range(N):  # one class per image: the label is the sample's identity
        d = tmp_path / "src" / f"c{i:03d}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / "x.jpg")
    out = tmp_path / "shards"
    assert main(["pack-images", str(tmp_path / "src"), str(out), "--workers", "1",
                 "--max-per-shard", str(PER_SHARD)]) == 0  # fmt: skip
    return out


def _labels_of(shard: Path) -> list[int]:
    with tarfile.open(shard) as tf:
        return [int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")]


class Labels(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += [int(v) for v in batch[1]]


def test_a_run_over_a_failing_http_server_sees_every_other_sample_once(tmp_path, monkeypatch):
    shards = _pack(tmp_path)
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert len(names) == N // PER_SHARD
    owner = {n: _labels_of(shards / n) for n in names}
    gone, cut, reset, stop, slow = names[1], names[3], names[5], names[6], names[8]
    (shards / gone).unlink()  # a 404 (meta.json still lists it)
    data = (shards / cut).read_bytes()
    (shards / cut).write_bytes(data[: len(data) // 2])  # a truncated shard, served in full
    kept_of_cut = set(_labels_of_prefix(shards / cut))
    # the stated limits: no shard waits longer than 20 s without a byte (5 s per read)
    monkeypatch.setenv("UNIPRED_SHARD_TIMEOUT", "5")
    monkeypatch.setenv("UNIPRED_SHARD_DEADLINE", "20")
    server = FaultyShards(shards, {reset: "reset", stop: "stop", slow: "slow"})
    try:
        spec = server.url(f"{names[0].rsplit('-', 1)[0]}-{{000000..{len(names) - 1:06d}}}.tar")
        run = tmp_path / "run"
        cfg = load_config(None, [
            "task=image_pretrain", "model.name=nepa_debug", f"data.root={spec}",
            "data.aug.img_size=16", "trainer.global_batch=4", "model.predictor.drop_path=0",
            "trainer.progress_bar=false", "trainer.loggers=[csv]", "trainer.accelerator=cpu",
            "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "ema.enabled=false",
            "trainer.collapse_every_n_steps=0", "data.num_workers=2", "data.val_root=''",
            "data.max_bad_fraction=0.5", f"run_dir={run}"])  # fmt: skip
        labels = Labels()
        t0 = time.monotonic()
        fit(cfg, callbacks=[labels])
        took = time.monotonic() - t0
    finally:
        server.close()
    # every sample of a readable shard exactly once; of the truncated one, what it still had
    expected = [y for n in names if n not in (gone, cut) for y in owner[n]] + sorted(kept_of_cut)
    assert sorted(labels.seen) == sorted(expected)
    assert not set(owner[gone]) & set(labels.seen)
    # the faults were met: the reset and the stopped shard were resumed with Range requests
    for name in (reset, stop):
        assert any(n == name and r.startswith("bytes=") for n, r in server.requests), name
    # what is gone for good is counted, by URL, in data_report.json
    report = json.loads((run / "data_report.json").read_text())
    counts = report["total"]
    assert counts["skipped/shard_gone"] == PER_SHARD
    assert counts["skipped/truncated"] == PER_SHARD - len(kept_of_cut)
    assert counts["skipped/total"] + len(labels.seen) == N
    files = {(b["reason"], b["file"]) for e in report["epochs"] for b in e["bad_files"]}
    assert ("skipped/shard_gone", server.url(gone)) in files
    assert ("skipped/truncated", server.url(cut)) in files
    # the time spent waiting for data is logged beside the speed
    metrics = (run / "logs/version_0/metrics.csv").read_text().splitlines()
    col = metrics[0].split(",").index("perf/data_wait")
    waits = [float(r.split(",")[col]) for r in metrics[1:] if r.split(",")[col]]
    assert waits and all(0 <= w <= 1 for w in waits) and max(waits) > 0.2
    assert ("-", "down") in server.requests and ("-", "up") in server.requests
    assert took < 120  # three seconds down, a slow shard: far from any deadline


def _labels_of_prefix(path: Path) -> list[int]:
    """Labels of the complete samples a truncated tar still holds (all of a sample's parts)."""
    parts: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r|") as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                parts.setdefault(key, {})[ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError):
        pass
    complete = [p for p in parts.values() if {"cls", "jpg", "json"} <= set(p)]
    return [int(p["cls"]) for p in complete]


def test_a_server_that_never_answers_is_given_up_after_the_deadline():
    """Accepts connections, never sends a byte: the shard is gone after deadline + timeout."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{lsock.getsockname()[1]}/shard-000000.tar"
    policy = NetworkPolicy(timeout=0.5, deadline=2.0, backoff=0.1, backoff_max=0.4)
    t0 = time.monotonic()
    try:
        with pytest.raises(ShardGone, match="no progress for 2 s"):
            open_shard(url, policy).read()
    finally:
        stop.set()
        lsock.close()
        for s in held:
            s.close()
    assert time.monotonic() - t0 < policy.deadline + 2 * policy.timeout + 1


def test_a_missing_shard_is_gone_at_once_and_a_refused_one_after_the_deadline(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"x" * 10)
    server = FaultyShards(tmp_path, {})
    try:
        t0 = time.monotonic()
        with pytest.raises(ShardGone, match="HTTP 404"):
            open_shard(server.url("nope.tar"))
        assert time.monotonic() - t0 < 1  # a 404 is not retried
        assert open_shard(server.url("a.tar")).read() == b"x" * 10
    finally:
        server.close()
    policy = NetworkPolicy(timeout=0.5, deadline=1.5, backoff=0.1, backoff_max=0.3)
    t0 = time.monotonic()
    with pytest.raises(ShardGone, match="no progress"):
        open_shard(server.url("a.tar"), policy)  # nobody listens any more
    assert 1.0 < time.monotonic() - t0 < 4


def test_fsspec_urls_are_read_through_fsspec_with_their_meta_json(tmp_path):
    """Any other ``scheme://`` goes through fsspec (here its in-memory file system, standing in
    for s3:// or gs://, which need their client libraries and a network): sizes come from the
    meta.json beside the shards, a missing shard is counted as gone under its URL."""
    fsspec = pytest.importorskip("fsspec")
    from unipred.tasks.image.data import ShardDataset

    from unipred.data.accounting import BadSampleCounter

    shards = _pack(tmp_path)
    fs = fsspec.filesystem("memory")
    names = sorted(p.name for p in shards.glob("*.tar"))
    for p in [*shards.glob("*.tar"), shards / "meta.json"]:
        if p.name != names[2]:  # one shard is missing from the store
            fs.pipe(f"/unipred-test/{p.name}", p.read_bytes())
    try:
        c = BadSampleCounter()
        spec = f"memory://unipred-test/{names[0].rsplit('-', 1)[0]}-{{000000..000009}}.tar"
        ds = ShardDataset(spec, transform=lambda im: 0, training=False, counter=c)
        assert ds.known and ds.num_samples == N  # sizes from the remote meta.json
        labels = sorted(y for _, y in ds)
        lost = _labels_of(shards / names[2])
        assert labels == sorted(set(range(N)) - set(lost))
        assert c.snapshot()["skipped/shard_gone"] == PER_SHARD
        assert any(b["file"].endswith(names[2]) for b in c.bad_files())
    finally:
        fs.rm("/unipred-test", recursive=True)


UNEVEN = Path(__file__).parent / "fixtures" / "uneven_fit.py"
UNEVEN_LOADER = Path(__file__).parent / "fixtures" / "uneven_loader.py"


def _damage(shards: Path):
    """Of the packed ``shards``, one deleted (a 404; meta.json still lists it) and one
    truncated so that it keeps an odd number of complete samples: the ranks lose different
    numbers of samples, and one ends in a partial batch. -> (names, labels per shard, the
    deleted, the truncated, the labels it kept)."""
    names = sorted(p.name for p in shards.glob("*.tar"))
    owner = {n: _labels_of(shards / n) for n in names}
    gone, cut = names[2], names[7]
    (shards / gone).unlink()
    data = (shards / cut).read_bytes()
    for frac in (0.5, 0.4, 0.6, 0.3, 0.7, 0.8, 0.2):
        (shards / cut).write_bytes(data[: int(len(data) * frac)])
        kept = set(_labels_of_prefix(shards / cut))
        if len(kept) % 2:
            break
    assert len(kept) % 2, "no cut keeps an odd number of samples"
    return names, owner, gone, cut, kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loader_ranks(spec: str, out: Path, env: dict) -> list[dict]:
    """Both ranks of tests/fixtures/uneven_loader.py (2 workers each, batches of 2)."""
    port, procs = str(_free_port()), []
    try:
        procs = [subprocess.Popen([sys.executable, str(UNEVEN_LOADER), spec, str(out), str(r),
                                   "2", port, "2", "2"], env=env, stderr=subprocess.PIPE,
                                  text=True) for r in range(2)]  # fmt: skip
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), errs[0][-2000:] + errs[1][-2000:]
    return [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(2)]


_ENV = {
    "PYTHONSAFEPATH": "1",
    "OMP_NUM_THREADS": "1",
    "UNIPRED_SHARD_TIMEOUT": "5",
    "UNIPRED_SHARD_DEADLINE": "20",
}  # the stated limits: 5 s a read, 20 s without progress


def test_ranks_that_lose_different_samples_stay_in_step_without_repeating(tmp_path):
    """The shipped reader and loader on 2 gloo ranks (2 workers each, no model) over the
    faulty HTTP server, one shard a 404 and one truncated: both ranks deliver the same number
    of batches; the real ones hold every readable sample exactly once, the rank that ran out
    first pads with weight-0 copies, a partial batch is weighted by its share."""
    shards = _pack(tmp_path)
    names, owner, gone, cut, kept_of_cut = _damage(shards)
    server = FaultyShards(shards, {})
    try:
        pattern = f"{names[0].rsplit('-', 1)[0]}-{{000000..{len(names) - 1:06d}}}.tar"
        ranks = _loader_ranks(server.url(pattern), tmp_path / "a", {**os.environ, **_ENV})
    finally:
        server.close()
    steps = [r["steps"] for r in ranks]
    assert len(steps[0]) == len(steps[1])
    real = [s for st in steps for s in st if not s["padding"]]
    expected = [y for n in names if n not in (gone, cut) for y in owner[n]] + sorted(kept_of_cut)
    assert sorted(y for s in real for y in s["labels"]) == sorted(expected)
    assert any(s["padding"] and s["weight"] == 0.0 for st in steps for s in st)
    for a, b in zip(*steps):  # weights: world * n_rank / n_all, so they sum to the world size
        n = [0 if s["padding"] else len(s["labels"]) for s in (a, b)]
        assert [a["weight"], b["weight"]] == [2 * k / sum(n) for k in n]
    assert any(len(s["labels"]) == 1 for s in real)  # the partial batch was trained
    lost = sum(r["counts"].get("skipped/shard_gone", 0) for r in ranks)
    cut_lost = sum(r["counts"].get("skipped/truncated", 0) for r in ranks)
    assert (lost, cut_lost) == (PER_SHARD, PER_SHARD - len(kept_of_cut))
    assert sum(r["counts"].get("converted/repeated", 0) for r in ranks) == 0


@pytest.mark.slow  # 2 gloo ranks with 2 workers each: about half a minute on 2 loaded cores
def test_a_rank_whose_every_shard_is_gone_pads_with_a_borrowed_batch(tmp_path):
    """Every shard the epoch deals to rank 1 is a 404: it has no batch of its own to pad
    with, borrows rank 0's first, and pads every step; rank 0 trains each of its samples once
    with weight 2 (the whole global batch is its)."""
    from unipred.data import elastic

    shards = _pack(tmp_path)
    names = sorted(p.name for p in shards.glob("*.tar"))
    owner = {n: _labels_of(shards / n) for n in names}
    segs = elastic.epoch_segments(names, dict.fromkeys(names, PER_SHARD), 0, 0, True)
    rank1 = {u for w in range(2) for u, _, _ in elastic.assign(segs, 1, 2, w, 2, 2, True)[0]}
    for n in rank1:
        (shards / n).unlink()
    server = FaultyShards(shards, {})
    try:
        pattern = f"{names[0].rsplit('-', 1)[0]}-{{000000..{len(names) - 1:06d}}}.tar"
        only0 = _loader_ranks(server.url(pattern), tmp_path / "b", {**os.environ, **_ENV})
    finally:
        server.close()
    s0, s1 = only0[0]["steps"], only0[1]["steps"]
    assert len(s0) == len(s1) == PER_SHARD * (len(names) - len(rank1)) // 2
    assert all(s["padding"] and s["weight"] == 0.0 for s in s1)
    assert not any(s["padding"] for s in s0) and all(s["weight"] == 2.0 for s in s0)
    assert s1[0]["labels"] == s0[0]["labels"]
    mine = sorted(y for n in names if n not in rank1 for y in owner[n])
    assert sorted(y for s in s0 for y in s["labels"]) == mine
    assert only0[1]["counts"]["skipped/shard_gone"] == PER_SHARD * len(rank1)


@pytest.mark.slow  # 2 DDP ranks with a DataLoader worker each, one epoch: about a minute
def test_two_ranks_over_a_failing_server_see_every_other_sample_exactly_once(tmp_path):
    """2 gloo DDP ranks read shards over HTTP; one shard is a 404, one is truncated, one
    connection is reset. The rank that lost samples ends its share early and pads (loss
    weight 0) until the other is done: no sample is trained twice, every readable one once."""
    shards = _pack(tmp_path)
    names, owner, gone, cut, kept_of_cut = _damage(shards)
    reset = names[4]
    server = FaultyShards(shards, {reset: "reset"})
    run, env = tmp_path / "run", {**os.environ, **_ENV}
    try:
        spec = server.url(f"{names[0].rsplit('-', 1)[0]}-{{000000..{len(names) - 1:06d}}}.tar")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, str(UNEVEN), spec, str(run), "2", "1"], env=env,
                           capture_output=True, text=True, timeout=400)  # fmt: skip
        took = time.monotonic() - t0
    finally:
        server.close()
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((run / f"steps-{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # in step: the same number of batches
    trained = [y for steps in ranks for s in steps if not s["padding"] for y in s["labels"]]
    expected = [y for n in names if n not in (gone, cut) for y in owner[n]] + sorted(kept_of_cut)
    assert sorted(trained) == sorted(expected)  # each once: nothing repeated, nothing lost
    pads = [s for steps in ranks for s in steps if s["padding"]]
    assert pads and all(s["weight"] == 0.0 and s["loss"] == 0.0 for s in pads)
    report = json.loads((run / "data_report.json").read_text())
    counts = report["total"]
    assert counts["skipped/shard_gone"] == PER_SHARD
    assert counts["skipped/truncated"] == PER_SHARD - len(kept_of_cut)
    assert counts.get("converted/repeated", 0) == 0
    files = {(b["reason"], b["file"]) for e in report["epochs"] for b in e["bad_files"]}
    assert ("skipped/shard_gone", server.url(gone)) in files
    assert ("skipped/truncated", server.url(cut)) in files
    assert any(n == reset and r.startswith("bytes=") for n, r in server.requests)
    assert took < 300, took  # far below any deadline: nothing waited on a shard


@pytest.mark.slow  # two DDP runs of 2 gloo ranks: two minutes or more on 2 loaded cores
def test_two_ranks_killed_mid_epoch_over_a_failing_server_resume_without_repeats(tmp_path):
    """The run of the test above (2 DDP ranks, a 404 and a truncated shard) is killed after
    its step-2 checkpoint and resumed with resume=auto (1 -> 2 workers per rank): over the two
    runs every readable sample is trained exactly once, none repeated."""
    shards = _pack(tmp_path)
    names, owner, gone, cut, kept_of_cut = _damage(shards)
    server = FaultyShards(shards, {})
    run, env = tmp_path / "run", {**os.environ, **_ENV}
    script = Path(__file__).parent / "fixtures" / "elastic_fit.py"
    extra = ["data.max_bad_fraction=0.5"]
    try:
        spec = server.url(f"{names[0].rsplit('-', 1)[0]}-{{000000..{len(names) - 1:06d}}}.tar")
        runs = []
        for run_id, workers, kill in (("1", "1", "3"), ("2", "2", "0")):
            args = [sys.executable, str(script), spec, str(run), "2", workers, run_id, kill]
            runs.append(subprocess.run([*args, *extra], env=env, capture_output=True,
                                       text=True, timeout=500))  # fmt: skip
    finally:
        server.close()
    assert runs[0].returncode != 0 and "killed at step 3" in runs[0].stderr, runs[0].stderr[-3000:]
    assert runs[1].returncode == 0, runs[1].stderr[-3000:]
    # each step's labels, both ranks; the resumed run's record of a step replaces the killed
    # run's (that step was not in the checkpoint)
    by_step: dict[int, dict[str, list[int]]] = {}
    for path in sorted(run.glob("keys-*.json")):
        rec = json.loads(path.read_text())
        for step, labels in rec["steps"].items():
            by_step.setdefault(int(step), {}).setdefault(str(rec["run"]), []).extend(labels)
    seen = [y for step in sorted(by_step) for y in by_step[step][max(by_step[step])]]
    expected = [y for n in names if n not in (gone, cut) for y in owner[n]] + sorted(kept_of_cut)
    assert sorted(seen) == sorted(expected)
    report = json.loads((run / "data_report.json").read_text())
    counts = report["total"]  # the epoch's, over both runs, each lost sample counted once
    assert counts["skipped/shard_gone"] == PER_SHARD
    assert counts["skipped/truncated"] == PER_SHARD - len(kept_of_cut)
    assert counts.get("converted/repeated", 0) == 0
    files = {(b["reason"], b["file"]) for e in report["epochs"] for b in e["bad_files"]}
    assert {
        ("skipped/shard_gone", server.url(gone)),
        ("skipped/truncated", server.url(cut)),
    } <= files
