"""What a run tells the person who started it, beyond progress lines: one line of what the
data gave (classes, samples per split, the labelled subset) when training starts, and one
line of its final metrics when it ends, also written to ``RUN_DIR/results.json``.

Accuracies and IoUs (every metric a task builds with ``build_metrics``: fractions in
[0, 1]) are shown and stored in percent, as the evaluation tables show them; losses stay as
they are. ``results.json`` names the unit of every number (``units``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import lightning as L

from unipred.base.quiet import percent_metrics


def _size(ds) -> int | None:
    try:
        return len(ds) if ds is not None else None
    except TypeError:  # a stream: its length is not known before it is read
        return None


def data_line(lit) -> str | None:
    """``data: 10 classes (data.num_classes: data: 10 class folders in DIR/train); train 6000
    samples, labelled subset 100 (10 per class, data.subset_seed=0); val 1000 samples`` for
    a task with classes; None for one without (pretraining)."""
    task = lit.task
    if not hasattr(task, "num_classes"):
        return None
    n = task.num_classes()
    d = lit.cfg.data
    from unipred.train.provenance import source_of

    origin = source_of(lit.cfg, "data.num_classes")  # who set it: the recipe, the data, ...
    parts = [f"{n} classes (data.num_classes: {origin})"]
    for split in ("train", "val"):
        ds = lit.dataset(split)
        if ds is None:
            parts.append(f"no {split} split" + (" (data.mode=eval)" if split == "train" else ""))
            continue
        size, rep = _size(ds), max(1, int(getattr(d, "repeat", 1) or 1))
        if split == "train" and size is not None and rep > 1 and size % rep == 0:
            size //= rep  # the repeats are fresh augmentations of the same samples
        budget = getattr(task, "labelled", None) if split == "train" else None
        if budget:
            size = budget["of"]
        text = f"{split} {size} samples" if size is not None else f"{split} streamed"
        if budget:
            text += (f", labelled subset {budget['kept']} ({budget['per_class']} per class, "
                     f"data.subset_seed={d.subset_seed})")  # fmt: skip
        elif split == "train" and getattr(d, "labels_per_class", 0):
            text += f" (data.labels_per_class={d.labels_per_class}, applied by the data source)"
        if split == "train" and rep > 1:
            text += f", repeated {rep}x per epoch"
        parts.append(text)
    return "data: " + "; ".join(parts)


class DataLine(L.Callback):
    """Prints :func:`data_line` once, when training starts (rank 0)."""

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero and not getattr(self, "_done", False):
            self._done = True
            line = data_line(pl_module)
            if line:
                print(f"[unipred] {line}", flush=True)


def _fmt_duration(secs: float) -> str:
    secs = int(round(secs))
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def final_metrics(logged: dict, lit) -> tuple[dict[str, float], dict[str, str]]:
    """``({name: value}, {name: unit})`` of the last validation and training metrics among
    ``logged`` (the trainer's callback metrics); fraction metrics in percent."""
    pct = percent_metrics(lit)
    values, units = {}, {}
    for k, v in sorted(logged.items()):
        if not k.startswith(("val/", "val_ema/")) and k != "train/loss":
            continue
        x = float(v)
        if not math.isfinite(x):
            values[k], units[k] = None, "not finite"
            continue
        if k in pct:
            values[k], units[k] = round(100 * x, 4), "%"
        else:
            values[k], units[k] = round(x, 6), "as logged"
    return values, units


def summary_line(values: dict, units: dict, steps: int, secs: float, where: str) -> str:
    """One line: ``result: 150 steps in 1m02s; val/acc1 35.66 %, val/loss 1.234, ...``."""
    order = sorted(values, key=lambda k: (units.get(k) != "%", k.startswith("train/"), k))
    shown = []
    for k in order:
        v = values[k]
        shown.append(
            f"{k} {'nan' if v is None else f'{v:.2f} %' if units[k] == '%' else f'{v:.4g}'}"
        )
    if not any(k.startswith("val") for k in values):
        shown.append("no validation (the data has no val split)")
    return f"result: {steps} steps in {_fmt_duration(secs)}; {', '.join(shown)} ({where})"


class RunSummary(L.Callback):
    """Ends ``fit`` (engine.py calls :meth:`finish` after ``trainer.fit``): one summary line of
    the final metrics, and ``RUN_DIR/results.json`` with the same numbers and their units.

    A run that stopped at ``trainer.max_steps`` after its last validation (mid-epoch, or
    before the first epoch ended) is validated once more first, so the result describes the
    weights the run ends with."""

    def __init__(self, out: Path, write: bool = True):
        self.out, self.write, self._t0 = Path(out), write, time.time()
        self.validated_at: int | None = None  # the global step of the last validation

    def on_fit_start(self, trainer, pl_module):
        self._t0 = time.time()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step

    def finish(self, trainer, lit) -> None:
        """Validate if the last steps were never validated, then print and write."""
        step = trainer.global_step
        ended_by_steps = trainer.max_steps and trainer.max_steps > 0 and step >= trainer.max_steps
        trained = dict(trainer.callback_metrics)  # validate() starts its metrics afresh
        if ended_by_steps and self.validated_at != step and lit.dataset("val") is not None:
            trainer.validate(lit, verbose=False)
        if not trainer.is_global_zero:
            return
        values, units = final_metrics({**trained, **trainer.callback_metrics}, lit)
        secs = time.time() - self._t0
        path = self.out / "results.json"
        where = str(path) if self.write else "fast_dev_run: nothing written"
        print(summary_line(values, units, step, secs, where), flush=True)
        if not self.write:
            return
        record = {
            "task": lit.cfg.task,
            "steps": step,
            "epochs": trainer.current_epoch,
            "seconds": round(secs, 1),
            "metrics": values,
            "units": units,
            "note": "accuracies and IoUs in percent (unit '%'); losses as logged",
        }
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)


def planned_steps(cfg) -> tuple[int | None, str]:
    """The optimizer steps a run of ``cfg`` will take, and how that was decided (for
    ``--print-config``): ``trainer.max_steps`` when set, else the epochs times the steps an
    epoch of the training set gives (the set is built to be counted; a stream has no count)."""
    import math

    from unipred.base.registry import TASKS
    from unipred.train.trainer import BatchPlan

    t = cfg.trainer
    if t.max_steps > 0:
        return t.max_steps, "trainer.max_steps"
    plan = BatchPlan.of(t, cfg.optim)
    try:
        ds = TASKS.get(cfg.task)(cfg).build_dataset("train")
        n = len(ds) if ds is not None else None
    except Exception as e:  # noqa: BLE001 - missing data is reported by the run itself
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        return None, f"unknown: the training data cannot be read: {msg}"
    if n is None:
        return None, "unknown: no training split"
    chunk = plan.per_device_batch * plan.accumulate_grad_batches
    batches = (n // plan.world_size) // chunk * chunk // plan.per_device_batch
    lim = t.limit_train_batches
    if lim is not None:
        batches = min(batches, int(lim)) if lim > 1 else int(batches * lim)
    per_epoch = math.ceil(batches / plan.accumulate_grad_batches)
    epochs = max(t.max_epochs, 1)
    return per_epoch * epochs, (
        f"{epochs} epochs x {per_epoch} steps ({n} training samples, global batch "
        f"{plan.global_batch})"
    )
