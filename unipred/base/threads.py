"""How many CPU threads a run uses: every core that is idle *now*, unless told.

Why it matters: with more runnable threads than cores, every parallel region of a step waits for
a descheduled thread. On this project's 2-core machine a demo step took 38.8 s with 2 threads
and 4.4 s with 1 while other jobs held the cores (on an idle machine 2 threads are ~1.6x faster).
The 1-minute load average is the wrong signal: it still reads ~1.0 a minute after a busy
install has finished, which halved the threads of a `make demo` on an idle machine.
"""

from __future__ import annotations

import os
import time


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies over all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return idle, sum(fields[:8])  # guest time is already inside user / nice


def idle_cores(window: float = 0.5) -> float:
    """Cores left idle by all processes, measured over the next ``window`` seconds."""
    cores = os.cpu_count() or 1
    first = _cpu_times()
    if first is None:  # no /proc: fall back to the (lagging) load average
        try:
            return max(0.0, cores - os.getloadavg()[0])
        except OSError:
            return float(cores)
    time.sleep(window)
    second = _cpu_times()
    busy_total = second[1] - first[1]
    if busy_total <= 0:
        return float(cores)
    return cores * (second[0] - first[0]) / busy_total


def _apply(n: int) -> str:
    import torch

    cores = os.cpu_count() or 1
    idle = idle_cores()
    if n <= 0:
        n = max(1, min(cores, round(idle)))
    torch.set_num_threads(n)
    return f"{n} torch thread(s) ({cores} cores, {idle:.1f} idle)"


def set_threads(n: int = 0) -> str:
    """Set torch's intra-op threads to ``n``, or with 0 to the cores idle now (at least 1).

    An ``n > 0`` (a demo's ``--threads N``) is the user's choice for the whole process: later
    engine runs with ``trainer.threads=0`` keep it and do not re-check it. Returns a line for
    the logs."""
    global _fixed
    if n > 0:
        _fixed = True
    return _apply(n)


def user_fixed_threads() -> bool:
    """Whether this process's threads were fixed by ``set_threads(n > 0)``."""
    return _fixed


_auto_set = False
_fixed = False


def threads_for_run(threads: int, accelerator: str, devices: int) -> str | None:
    """Apply ``trainer.threads`` for a run on the CPU (a GPU run's threads are left alone).

    0 picks the idle cores once per process (later runs in the same process keep that choice,
    so a notebook or a demo does not pay the measurement again), split over the processes of a
    CPU DDP run, unless ``set_threads(n > 0)`` fixed them; -1 leaves torch's own default; n > 0
    sets n. Returns a line for the logs."""
    global _auto_set
    import torch

    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu or threads < 0:
        return None
    if threads == 0:
        if _auto_set or _fixed:
            return None
        _auto_set = True
        threads = max(1, round(idle_cores()) // max(1, devices))
    return _apply(threads)


class FreeCores:
    """Cores that *other* processes left free since the previous reading, without sleeping.

    Reads /proc/stat (all cores) and this process's own CPU time at each call; the difference
    is the other processes' load. Our own threads must not count: a run that spins two OpenMP
    threads would otherwise read its own work as a busy machine and never raise its threads."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self._last = (_cpu_times(), time.process_time(), time.monotonic())

    def read(self) -> float | None:
        """Free cores over the window since the previous call (or ``reset``); None when it
        cannot tell (no /proc, or a window shorter than the kernel's tick)."""
        stat, own, wall = _cpu_times(), time.process_time(), time.monotonic()
        (stat0, own0, wall0), self._last = self._last, (stat, own, wall)
        if stat is None or stat0 is None or wall <= wall0:
            return None
        total = stat[1] - stat0[1]
        if total <= 0:
            return None
        cores = os.cpu_count() or 1
        busy = cores * (1.0 - (stat[0] - stat0[0]) / total)
        others = max(0.0, busy - (own - own0) / (wall - wall0))
        return max(0.0, cores - others)


def threads_for_free(free: float) -> int:
    """Threads for ``free`` cores during a run: rounds down unless within a quarter core,
    because one thread too many costs far more than one too few (see the module doc)."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(free + 0.25)))
