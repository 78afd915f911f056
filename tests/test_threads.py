"""The thread policy of the demos and of every CPU run (unipred.base.threads)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from unipred.base import threads


def _fake_proc_stat(monkeypatch, idle_fraction: float, cores: int = 4):
    samples = iter([(0.0, 0.0), (idle_fraction * 1000, 1000.0)])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)


def test_idle_cores_now_decides_not_the_load_average(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_fixed", False)
    try:
        # a high 1-minute average from earlier work must not matter when the cores are idle now
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.9, 0.0, 0.0))
        _fake_proc_stat(monkeypatch, idle_fraction=1.0)
        assert threads.set_threads(0).startswith("4 torch thread") and torch.get_num_threads() == 4
        _fake_proc_stat(monkeypatch, idle_fraction=0.3)  # 1.2 of 4 cores idle
        assert threads.set_threads(0).startswith("1 torch thread") and torch.get_num_threads() == 1
        _fake_proc_stat(monkeypatch, idle_fraction=0.0)  # fully busy: still at least one
        assert threads.set_threads(0).startswith("1 torch thread")
        _fake_proc_stat(monkeypatch, idle_fraction=0.0)
        assert threads.set_threads(2).startswith("2 torch thread") and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_idle_cores_reads_this_machine():
    idle = threads.idle_cores(window=0.1)
    assert 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6


def test_run_threads_split_over_cpu_processes_and_measured_once(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_auto_set", False)
    monkeypatch.setattr(threads, "_fixed", False)
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.5: 4.0)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    try:
        assert threads.threads_for_run(0, "cpu", devices=2).startswith("2 torch thread")
        assert threads.threads_for_run(0, "cpu", devices=1) is None  # chosen once per process
        assert threads.threads_for_run(3, "cpu", devices=1).startswith("3 torch thread")
        assert threads.threads_for_run(-1, "cpu", devices=1) is None
    finally:
        torch.set_num_threads(before)


def test_a_users_thread_count_is_kept_by_later_automatic_runs(monkeypatch):
    """A demo's ``--threads 2``: the engine's runs (trainer.threads=0) keep it, no re-check."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_auto_set", False)
    monkeypatch.setattr(threads, "_fixed", False)
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.5: 1.0)
    try:
        assert not threads.user_fixed_threads()
        threads.set_threads(0)  # the demo's default: automatic, not fixed
        assert not threads.user_fixed_threads()
        threads.set_threads(2)
        assert threads.user_fixed_threads()
        assert threads.threads_for_run(0, "cpu", devices=1) is None
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_free_cores_counts_other_processes_not_this_one(monkeypatch):
    """2 cores fully busy over 10 s, 1.0 core of it this process's own threads: 1 core free."""
    stat = iter([(0.0, 0.0), (0.0, 2000.0)])  # (idle, total) jiffies: no idle at all
    own, wall = iter([0.0, 10.0]), iter([0.0, 10.0])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(stat))
    monkeypatch.setattr(threads.time, "process_time", lambda: next(own))
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(wall))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    free = threads.FreeCores()
    assert abs(free.read() - 1.0) < 1e-9
    assert threads.threads_for_free(1.0) == 1 and threads.threads_for_free(1.8) == 2
    assert threads.threads_for_free(1.6) == 1 and threads.threads_for_free(0.0) == 1
    assert threads.threads_for_free(7.0) == 2  # never above the cores


def test_free_cores_reads_this_machine_without_sleeping():
    free = threads.FreeCores()
    sum(i * i for i in range(300_000))  # a little own work between the two reads
    got = free.read()
    assert got is None or 0.0 <= got <= (os.cpu_count() or 1) + 1e-6


class _Trainer:
    is_global_zero = True
    global_step = 7


def test_retune_raises_and_lowers_threads_between_steps_with_one_line(monkeypatch, capsys):
    from unipred.train.retune import ThreadRetune

    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    readings = iter([3.9, 1.1, 1.2])

    class Fake:
        def reset(self):
            pass

        def read(self):
            return next(readings)

    now = [0.0]
    cb = ThreadRetune(every_s=30, free=Fake(), clock=lambda: now[0])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cb.on_train_start(_Trainer(), None)
        now[0] = 10.0  # too early: nothing read, nothing changed
        cb.on_train_batch_end(_Trainer(), None, None, None, 0)
        assert torch.get_num_threads() == 1 and capsys.readouterr().out == ""
        now[0] = 31.0  # the other job ended: 3.9 cores free -> 4 threads
        cb.on_train_batch_end(_Trainer(), None, None, None, 1)
        assert torch.get_num_threads() == 4
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and "step 7: 1 -> 4 torch thread(s)" in out and "3.9" in out
        now[0] = 62.0  # a job came back: 1.1 free -> 1 thread
        cb.on_train_batch_end(_Trainer(), None, None, None, 2)
        assert torch.get_num_threads() == 1 and "4 -> 1 torch thread(s)" in capsys.readouterr().out
        now[0] = 93.0  # the same choice again: silent
        cb.on_train_batch_end(_Trainer(), None, None, None, 3)
        assert torch.get_num_threads() == 1 and capsys.readouterr().out == ""
    finally:
        torch.set_num_threads(before)


def test_only_automatic_single_process_cpu_runs_retune():
    from unipred.train.engine import _retunes_threads
    from unipred.train.trainer import TrainerConfig

    assert _retunes_threads(TrainerConfig(accelerator="cpu"))
    assert not _retunes_threads(TrainerConfig(accelerator="cpu", threads=2))  # the user's N
    assert not _retunes_threads(TrainerConfig(accelerator="cpu", threads=-1))
    assert not _retunes_threads(TrainerConfig(accelerator="cpu", threads_check_s=0))
    assert not _retunes_threads(TrainerConfig(accelerator="cpu", devices=2))  # CPU DDP
    assert not _retunes_threads(TrainerConfig(accelerator="gpu"))


def test_a_cli_run_says_its_threads_and_runs_the_retune(tmp_path):
    """The shipped CLI, tiny run, re-checking at every step: the start line names the threads
    and the re-check period, and the run finishes with the callback active."""
    tiny = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"
    cmd = [sys.executable, "-m", "unipred.cli", "fit", str(tiny), f"run_dir={tmp_path}",
           "trainer.progress_bar=false", "trainer.loggers=[csv]", "data.image_size=16",
           "data.train_samples=32", "data.val_samples=8", "trainer.global_batch=8",
           "trainer.max_steps=3", "ema.enabled=false", "trainer.threads_check_s=0.01"]  # fmt: skip
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONSAFEPATH": "1"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    line = re.search(r"\[unipred\] (\d+) torch thread\(s\) .*re-checked every 0.01 s", p.stdout)
    assert line, p.stdout[-2000:]
    assert 1 <= int(line.group(1)) <= (os.cpu_count() or 1)
