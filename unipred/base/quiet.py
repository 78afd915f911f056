"""Quiet, honest console output: third-party tips and noise filtered, plain progress lines when
the output is not a terminal (a log file gets no escape codes)."""

from __future__ import annotations

import logging
import sys
import time
import warnings

import lightning as L

# Lightning info lines that carry no information about this run
_NOISE_INFO = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:")
# warnings that describe Lightning's or torch's internals, not the user's run; the engine
# handles what they warn about (short epochs log at their end, empty val lists are intended)
_NOISE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"Total length of `\w+` across ranks is zero",
    r"The '\w+_dataloader' does not have many workers",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_NOISE_INFO)


_installed = False


def quiet_third_party() -> None:
    """Install the filters (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class PlainProgress(L.Callback):
    """One line every ``every`` optimizer steps and one per validation, for logs and pipes.

    Reads the metrics the engine already logged (no extra device sync)."""

    def __init__(self, every: int, keys=("train/loss", "lr", "perf/samples_per_s")):
        self.every, self.keys, self._t0 = max(1, every), keys, time.time()

    def _line(self, trainer, what: str) -> None:
        if not trainer.is_global_zero:
            return
        parts = []
        for k in self.keys:
            v = trainer.callback_metrics.get(k)
            if v is not None:
                parts.append(f"{k.split('/')[-1]} {float(v):.4g}")
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        head = f"epoch {trainer.current_epoch} step {trainer.global_step}/{total}"
        secs = time.time() - self._t0
        print(f"[{secs:7.1f}s] {head} {what}{'  ' + '  '.join(parts) if parts else ''}",
              flush=True)  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.every == 0 and step != getattr(self, "_last", None):
            self._last = step
            self._line(trainer, "")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        vals = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        shown = "  ".join(f"{k} {v:.4g}" for k, v in sorted(vals.items()))
        self._line(trainer, f"validated: {shown}")


def use_tqdm() -> bool:
    """A live bar only on a terminal; plain lines otherwise."""
    return sys.stderr.isatty()
