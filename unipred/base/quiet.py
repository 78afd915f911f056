"""Quiet, honest console output: third-party tips and noise filtered, plain progress lines when
the output is not a terminal (a log file gets no escape codes)."""

from __future__ import annotations

import logging
import sys
import time
import warnings

import lightning as L

# Lightning info lines that carry no information about this run
_NOISE_INFO = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Loading `train_dataloader` to estimate",
)
# warnings that describe Lightning's or torch's internals, not the user's run; the engine
# handles what they warn about (short epochs log at their end, empty val lists are intended)
_NOISE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"Total length of `\w+` across ranks is zero",
    r"The '\w+_dataloader' does not have many workers",
    # a run that ends before its first validation: the engine validates at the end itself
    # (unipred.train.run_report.RunSummary) and the best checkpoint follows the next validation
    r".*could not find the monitored key in the returned metrics",
    # DDP on a one-channel patch embedding: a size-1 dimension's stride differs between the
    # gradient and its bucket (either is valid; DDP copies that one small gradient), once per rank
    r"Grad strides do not match bucket view strides",
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


def percent_metrics(lit) -> set[str]:
    """The logged names (``val/acc1``, ``val_ema/mIoU``...) of the fraction metrics of ``lit``
    (every metric its task builds: accuracies and IoUs), shown in percent everywhere."""
    names = set(getattr(lit, "metrics", {}).keys())
    return {f"{prefix}/{n}" for n in names for prefix in ("val", "val_ema")}


def total_steps(trainer) -> int | None:
    """The optimizer steps this fit will run: ``max_steps`` when set, else Lightning's count
    from the epochs and the loader length; None when unknown (a stream without a length)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        n = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no loader yet, or one Lightning cannot count
        return None
    return int(n) if n and n != float("inf") else None


def eta(done: int, todo: int, secs: float) -> str:
    """``eta 1m05s`` from ``done`` steps taken in ``secs``, ``todo`` left; "" before a step."""
    if done <= 0 or todo < 0:
        return ""
    left = int(round(secs / done * todo))
    h, rem = divmod(left, 3600)
    m, s = divmod(rem, 60)
    return f"eta {h}h{m:02d}m" if h else f"eta {m}m{s:02d}s" if m else f"eta {s}s"


class PlainProgress(L.Callback):
    """One line every ``every`` optimizer steps and one per validation, for logs and pipes:
    ``[  12.3s] epoch 0 step 10/150 eta 2m41s  loss 1.23 ...``.

    Reads the metrics the engine already logged (no extra device sync). The ETA is the pace
    since this fit's first step (start-up, and the steps a resumed run skipped, excluded)."""

    def __init__(self, every: int, keys=("train/loss", "lr", "perf/samples_per_s")):
        self.every, self.keys, self._t0 = max(1, every), keys, time.time()
        self._start: tuple[int, float] | None = None  # (step, time) when this fit's steps began

    def on_train_start(self, trainer, pl_module):
        self._total = total_steps(trainer)

    def _line(self, trainer, what: str) -> None:
        if not trainer.is_global_zero:
            return
        parts = []
        for k in self.keys:
            v = trainer.callback_metrics.get(k)
            if v is not None:
                parts.append(f"{k.split('/')[-1]} {float(v):.4g}")
        total, step, now = getattr(self, "_total", None), trainer.global_step, time.time()
        head = f"epoch {trainer.current_epoch} step {step}/{total or '?'} "
        if total and self._start and step > self._start[0]:
            head += eta(step - self._start[0], total - step, now - self._start[1]) + " "
        fn = getattr(trainer.state, "fn", None)
        if fn is not None and getattr(fn, "value", fn) != "fit":  # `unipred eval`: no steps
            head = ""
        print(f"[{now - self._t0:7.1f}s] {head}{what}{'  ' + '  '.join(parts) if parts else ''}",
              flush=True)  # fmt: skip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._start is None:
            self._start = (trainer.global_step, time.time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.every == 0 and step != getattr(self, "_last", None):
            self._last = step
            self._line(trainer, "")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        pct = percent_metrics(pl_module)  # accuracies and IoUs: percent, as every table shows
        vals = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        shown = "  ".join(f"{k} {100 * v:.2f} %" if k in pct else f"{k} {v:.4g}"
                          for k, v in sorted(vals.items()))  # fmt: skip
        self._line(trainer, f"validated: {shown}")


def use_tqdm() -> bool:
    """A live bar only on a terminal; plain lines otherwise."""
    return sys.stderr.isatty()
