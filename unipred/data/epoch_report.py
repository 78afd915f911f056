"""The engine's per-epoch bad-sample report, and the stop for a training split that is too broken.

:class:`BadSampleLogger` (a Lightning callback, built by ``trainer.build_trainer``):

* at every epoch end, logs the counts of :data:`unipred.data.accounting.COUNTER` summed over
  DataLoader workers and ranks, writes them with the names of the bad files to
  ``RUN_DIR/data_report.json`` (one entry per epoch), then resets them;
* saves the map-style readers' per-file records in every checkpoint, so an epoch resumed after
  a preemption reports what the whole epoch met (streaming readers count again what they replay);
* stops the run when more than ``data.max_bad_fraction`` of the samples the training split
  reads in an epoch are unreadable: one line naming the data, the count and the folder
  holding most of them (:class:`TooManyBadSamples`, exit 2 from the CLI). A few broken files,
  however many in a row, are skipped and counted; only the fraction stops a run. It is
  judged once the epoch's count exceeds the fraction of the epoch's planned samples (so a
  badly broken split stops early), and at the epoch end for streams of unknown length.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import lightning as L
import torch

from unipred.data.accounting import BadSampleCounter, _gather, write_report

log = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.05
_CHECK_EVERY = 8  # batches between two mid-epoch checks (single process)


class TooManyBadSamples(ValueError):
    """More of the training split is unreadable than ``data.max_bad_fraction`` allows."""


def _skipped(counts: dict) -> int:
    return sum(v for k, v in counts.items() if k.startswith("skipped/") and k != "skipped/total")


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def books_of(ds, depth: int = 0) -> list:
    """The :class:`~unipred.data.book.SampleBook` of a map-style reader, looked for through
    the wrappers a loader or a task puts around it (``.dataset``, ``.datasets``)."""
    if ds is None or depth > 5:
        return []
    vars_ = getattr(ds, "__dict__", {})
    if "book" in vars_:
        return [vars_["book"]]
    inner = vars_.get("dataset")
    if inner is not None:
        return books_of(inner, depth + 1)
    return [b for d in vars_.get("datasets", ()) or () for b in books_of(d, depth + 1)]


def most_common_folder(names: list[dict]) -> tuple[str, int]:
    """The folder (or shard) holding most of the skipped files named, and how many."""
    where = Counter()
    for n in names:
        if n["reason"].startswith("skipped/"):
            f = n["file"]
            where[f.split(".tar:")[0] + ".tar" if ".tar:" in f else os.path.dirname(f)] += 1
    return where.most_common(1)[0] if where else ("", 0)


class BadSampleLogger(L.Callback):
    """See the module docstring. ``max_bad_fraction`` and ``root`` default to the run's
    ``data.max_bad_fraction`` and ``data.root``."""

    def __init__(self, counter: BadSampleCounter, report=None,
                 max_bad_fraction: float | None = None, root: str = ""):  # fmt: skip
        self.counter, self.report = counter, report
        self.max_bad_fraction, self.root = max_bad_fraction, root
        self.seen: set[str] = set()
        self._val_rows, self._v0 = 0, 0

    # -- configuration ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        if stage == "fit":  # before this run builds its data and loads its checkpoint
            self.counter.begin_run()
        data = getattr(getattr(pl_module, "cfg", None), "data", None)
        if self.max_bad_fraction is None:
            self.max_bad_fraction = getattr(data, "max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)
        self.root = self.root or getattr(data, "root", "")

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # every rank saves a checkpoint together, rank 0 writes it: it holds each rank's
        # books (the files that rank read), put back on the same rank
        return {"ranks": _gather([self.counter.state_dict()], _world())}

    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict.get("ranks", [state_dict])
        world, rank = _world(), _rank()
        if len(ranks) == world:
            self.counter.load_state_dict(ranks[rank])
        elif rank == 0:  # another world size: what every rank had read, counted on rank 0
            merged: dict = {}
            for part in ranks:
                for key, st in part.get("books", {}).items():
                    m = merged.setdefault(key, {"n": st["n"], "index": [], "reason": []})
                    m["index"] += st["index"]
                    m["reason"] += st["reason"]
            self.counter.load_state_dict({"books": merged})

    # -- what the training split met ----------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module):
        self._v0 = self._rows_skipped()

    def on_validation_epoch_end(self, trainer, pl_module):
        # streaming readers count into the shared rows: what validation added is not training's
        self._val_rows += self._rows_skipped() - self._v0

    def _rows_skipped(self) -> int:
        return _skipped(self.counter.snapshot(books=False))

    def _train(self, trainer) -> tuple[int, int | None, dict]:
        """(skipped samples of the training split this epoch on this rank, the samples the
        epoch plans to read on this rank or None when unknown, their skip reasons)."""
        loader = trainer.train_dataloader
        books = books_of(getattr(loader, "dataset", None))
        if books:
            reasons = {}
            for book in books:
                for k, v in book.counts().items():
                    reasons[k] = reasons.get(k, 0) + v
            skipped = _skipped(reasons)
        else:  # streaming readers count into the rows, validation's share taken out
            reasons = self.counter.snapshot(books=False)
            skipped = _skipped(reasons) - self._val_rows
        reasons = {k: v for k, v in reasons.items() if k.startswith("skipped/") and v}
        reasons.pop("skipped/total", None)
        planned = None
        batches, bs = trainer.num_training_batches, getattr(loader, "batch_size", None) or 1
        if isinstance(batches, int) or (isinstance(batches, float) and batches != float("inf")):
            planned = int(batches) * int(bs)
            if not books:  # a stream drops bad samples: it reads the good ones plus those
                planned += skipped
        return skipped, planned, reasons

    def _judged(self, trainer) -> bool:
        # a fast_dev_run reads a handful of batches: no fraction to judge
        return self.max_bad_fraction is not None and self.max_bad_fraction < 1 and (
            not trainer.fast_dev_run)  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.world_size > 1 or batch_idx % _CHECK_EVERY or not self._judged(trainer):
            return  # ranks are judged together, at the epoch end
        skipped, planned, _ = self._train(trainer)
        if planned and skipped > self.max_bad_fraction * planned:
            self._end_epoch(trainer, pl_module, stop=(skipped, planned))

    def on_train_epoch_end(self, trainer, pl_module):
        self._end_epoch(trainer, pl_module)

    # -- the epoch's entry --------------------------------------------------------------------
    def _end_epoch(self, trainer, pl_module, stop: tuple[int, int] | None = None):
        c = self.counter
        skipped, planned, reasons = self._train(trainer)
        if planned is None:  # a stream of unknown length: what it read
            loader = trainer.train_dataloader
            planned = getattr(loader, "consumed", 0) * (getattr(loader, "batch_size", 1) or 1)
            planned += skipped
        snap, names = c.snapshot(), c.bad_files()
        c.reset()
        self._val_rows = 0
        # the training split's own reasons, summed over ranks (their keys may differ)
        reasons = _gather([reasons], trainer.world_size) if stop is None else [reasons]
        split_reasons = {}
        for part in reasons:
            for k, v in part.items():
                split_reasons[k] = split_reasons.get(k, 0) + v
        vals = [*snap.values(), skipped, planned]
        t = torch.tensor(vals, dtype=torch.float64, device=pl_module.device)
        if stop is None:  # every rank is here together: sum over ranks
            t = trainer.strategy.reduce(t, reduce_op="sum")
        summed = [int(v) for v in t.tolist()]
        total = dict(zip(snap, summed[: len(snap)]))
        skipped, planned = summed[-2:]
        if stop is None:
            # a reason logged once stays in the columns (CSV needs them stable); totals always
            self.seen.update(k for k, v in total.items() if v or k.endswith("/total"))
            for k in sorted(self.seen):  # this rank's counts; Lightning sums them over ranks
                pl_module.log(f"data/{k}", float(snap[k]), sync_dist=True, reduce_fx="sum")
            names = _gather(names, trainer.world_size)
        epoch = trainer.current_epoch
        if self.report is not None and trainer.is_global_zero:
            write_report(self.report, epoch, trainer.global_step, total, names)
            if total["skipped/total"] + total["converted/total"]:
                log.info("epoch %d bad samples (all ranks): %s; names in %s",
                         epoch, {k: v for k, v in total.items() if v}, self.report)  # fmt: skip
        frac = self.max_bad_fraction
        if self._judged(trainer) and planned and skipped > frac * planned:
            raise TooManyBadSamples(
                self._message(epoch, skipped, planned, split_reasons, names, stop)
            )

    def _message(self, epoch, skipped, planned, split_reasons, names, stop) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(split_reasons.items()))
        folder, n = most_common_folder(names)
        where = f"; most in {folder} ({n} named)" if folder else ""
        when = " so far" if stop else ""  # mid-epoch: already more than the fraction
        report = f"; names in {self.report}" if self.report is not None else ""
        return (
            f"data.root={self.root or '?'}: {skipped} of the {planned} training samples of "
            f"epoch {epoch} are unreadable{when} ({skipped / planned:.1%}: {reasons}), more "
            f"than data.max_bad_fraction={self.max_bad_fraction}{where}{report}; remove or repair "
            "them, or raise data.max_bad_fraction"
        )
