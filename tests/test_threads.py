"""The thread policy of the demos and of every CPU run (unipred.threads)."""

import os

import torch

from unipred import threads


def _fake_proc_stat(monkeypatch, idle_fraction: float, cores: int = 4):
    samples = iter([(0.0, 0.0), (idle_fraction * 1000, 1000.0)])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)


def test_idle_cores_now_decides_not_the_load_average(monkeypatch):
    before = torch.get_num_threads()
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
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.5: 4.0)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    try:
        assert threads.threads_for_run(0, "cpu", devices=2).startswith("2 torch thread")
        assert threads.threads_for_run(0, "cpu", devices=1) is None  # chosen once per process
        assert threads.threads_for_run(3, "cpu", devices=1).startswith("3 torch thread")
        assert threads.threads_for_run(-1, "cpu", devices=1) is None
    finally:
        torch.set_num_threads(before)
