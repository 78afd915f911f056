"""Re-check a CPU run's thread count while it trains (``trainer.threads=0``, the default).

A run picks its threads from the cores idle when it starts (unipred/base/threads.py). A run that
started while another job held a core would keep 1 thread for its whole length: on 2026-12-06
``make demo`` did and took 35 minutes. This callback reads the other processes' load every
``every_s`` seconds of wall time (two /proc/stat reads and a clock: no sleep on the training
path) and raises or lowers torch's intra-op threads between steps, with one line each time.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

from unipred.base.threads import FreeCores, threads_for_free


class ThreadRetune(Callback):
    """Between training steps, every ``every_s`` seconds: set torch's threads to the cores
    other processes leave free over that window (``FreeCores``), printing a line on change."""

    def __init__(self, every_s: float = 30.0, free: FreeCores | None = None, clock=time.monotonic):
        self.every_s = every_s
        self.free = free or FreeCores()
        self.clock = clock
        self._next = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.free.reset()
        self._next = self.clock() + self.every_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every_s
        free = self.free.read()
        if free is None:
            return
        before, after = torch.get_num_threads(), threads_for_free(free)
        if after == before:
            return
        torch.set_num_threads(after)
        if trainer.is_global_zero:
            print(f"[unipred] step {trainer.global_step}: {before} -> {after} torch thread(s) "
                  f"({free:.1f} cores free of other jobs over the last {self.every_s:g} s)",
                  flush=True)  # fmt: skip
