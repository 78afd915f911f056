"""One training process per run folder.

Two ``unipred fit`` processes on one ``run_dir`` would write ``logs/version_0`` and
``version_1`` and overwrite each other's ``last.ckpt``, and the checkpoint left would be
whichever finished last. ``fit`` therefore holds ``RUN_DIR/.lock`` while it trains: a JSON
file naming the holder (pid, host, start time, command line). A second process finds it and is
refused in one line naming the holder (:class:`RunDirBusy`, exit 2 from the command).

A lock whose holder is gone is taken over, so a run requeued after a crash resumes without
anyone deleting files: on the same host the holder's pid is checked directly; a holder on
another host (a requeued cluster job lands anywhere) refreshes the file's time every
``HEARTBEAT_S`` seconds, and a lock not refreshed for ``STALE_S`` seconds counts as dead.

Only the main process takes the lock: the other ranks of a distributed run (``RANK``,
``LOCAL_RANK``, ``NODE_RANK``, ``SLURM_PROCID`` non-zero) share their rank 0's.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: a host that slow is not training either


class RunDirBusy(ValueError):
    """Another live process trains in this run folder (one line naming it)."""


def is_main_process() -> bool:
    """True unless the environment names this process a non-zero rank."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        v = os.environ.get(var, "0").strip()
        if v not in ("", "0"):
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half-written or foreign: treat as a holder we cannot name
        return {}


def holder_is_dead(info: dict, path: Path) -> bool:
    """Whether the process that wrote lock ``info`` (at ``path``) is gone."""
    host, pid = info.get("host"), info.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return not _alive(pid)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > STALE_S


def describe(info: dict, path: Path) -> str:
    """``pid 123 on host h (since 2026-12-06 16:05:01: unipred fit ...)``."""
    if not info:
        return f"an unreadable lock file {path}"
    cmd = info.get("command", "")
    cmd = cmd if len(cmd) <= 80 else cmd[:77] + "..."
    return (f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')}"
            f"{': ' + cmd if cmd else ''})")  # fmt: skip


class RunLock:
    """Holds ``RUN_DIR/.lock`` from :meth:`acquire` to :meth:`release` (a context manager)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _record(self) -> str:
        return json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["unipred", *sys.argv[1:]]) if sys.argv else "",
        })  # fmt: skip

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._record())
        return True

    def acquire(self) -> RunLock:
        """Take the lock, or take over a dead holder's; :class:`RunDirBusy` when it is alive."""
        if not is_main_process():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):  # a race with another taker: look again
            if self._create():
                break
            info = _read(self.path)
            if info is None:
                continue  # released in between
            if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                raise RunDirBusy(f"run_dir={self.path.parent} is already in use by this process")
            if not holder_is_dead(info, self.path):
                raise RunDirBusy(
                    f"run_dir={self.path.parent} is in use by {describe(info, self.path)}; "
                    f"wait for it to end or set another run_dir (the lock is {self.path}; it is "
                    "taken over by itself once that process is gone)"
                )
            if self._take_over(info):
                print(f"[unipred] took over the lock of {self.path.parent} from "
                      f"{describe(info, self.path)}, which is gone", flush=True)  # fmt: skip
        else:
            raise RunDirBusy(f"run_dir={self.path.parent}: could not take {self.path}")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="unipred-run-lock", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, dead: dict) -> bool:
        """Remove the lock of the dead holder ``dead``, unless another process took it over
        first (one taker at a time, through a second lock file)."""
        mutex = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:  # a taker that died while taking over leaves it behind
                if time.time() - mutex.stat().st_mtime > 60:
                    mutex.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            return False
        try:
            if _read(self.path) == dead:  # still the dead holder's: nobody was faster
                self.path.unlink()
                return True
            return False
        finally:
            mutex.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if not self.held:
            return
        self._stop.set()
        self.held = False
        info = _read(self.path)
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
