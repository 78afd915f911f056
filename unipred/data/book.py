"""Per-file bad-sample records of map-style readers: each file counted once per epoch.

A map-style reader (a folder of images, clips, videos) knows its files by index. Rather than
adding one to a counter each time a file is decoded (which counts a file again when it is
decoded a second time: as a substitute for a bad neighbour, in a batch prefetched before a
preemption and read again after the resume), it records in a :class:`SampleBook` *the* reason
of each file for the epoch: one small shared-memory tensor, one entry per file, the first
reason met wins. The counts of an epoch are the histogram of the book, the names its entries:
exact whatever the number of workers, substitutes or restarts. The book is attached to its
:class:`~unipred.data.accounting.BadSampleCounter`, so ``counter.snapshot()`` and
``counter.bad_files()`` include it, and its entries are saved in checkpoints
(``counter.state_dict()``), so a resumed epoch reports what the whole epoch met.

:meth:`SampleBook.first_good` is the substitution every folder reader uses: a bad file is
recorded and replaced by the next readable file (batches stay full); a file known bad is not
decoded again while looking for a substitute, so a long run of broken files costs one decode
each, and only a split with no readable file at all stops (:class:`NoReadableSample`).
Whether an epoch had too many bad files is decided by the engine (``data.max_bad_fraction``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from unipred.data.accounting import COUNTER, BadSampleCounter, reading

log = logging.getLogger(__name__)
_WARN_FIRST = 20


class NoReadableSample(ValueError):
    """No file of a split can be read: nothing can be substituted (one line, exit 2)."""


def error_line(e: BaseException) -> str:
    """The one line to show for ``e``: its first line, or for an error raised in a DataLoader
    worker (which torch re-raises as "Caught X in DataLoader worker process N." plus the
    worker's traceback) the worker's own message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Caught ") and "Original Traceback" in str(e):
        last = lines[-1]  # "package.module.ErrorType: message"
        head, sep, rest = last.partition(": ")
        return rest if sep and head.split(".")[-1] == type(e).__name__ else last
    return lines[0]


class SampleBook:
    """The epoch's reason per file of a map-style reader (see the module docstring).

    ``names[i]`` names file i (a path, or a tuple whose first element is the path). ``key``
    identifies the reader across a restart (its root), so a checkpoint's entries return to
    the same reader."""

    def __init__(self, names: Sequence, key: str, counter: BadSampleCounter | None = None):
        self.names, self.key = names, str(key)
        self.counter = counter or COUNTER
        n = len(names)
        # normal tensors even when a reader is built under inference mode (an `evaluate` in
        # this process): a later reset or record outside it updates them in place
        with torch.inference_mode(False):
            # column + 1 of the reason in the counter's table; 0: nothing met this epoch
            self.marks = torch.zeros(n, dtype=torch.int16).share_memory_()
            # files found unreadable in any epoch: not decoded again as substitutes
            self.bad = torch.zeros(n, dtype=torch.bool).share_memory_()
        self._warned = 0
        self.counter.attach(self)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        x = self.names[i]
        return str(x[0] if isinstance(x, (tuple, list)) else x)

    def _skip_cols(self) -> set[int]:
        return {c for k, c in self.counter._columns.items() if k.startswith("skipped/")}

    def at(self, i: int) -> _Entry:
        """A counter-like object recording reasons for file ``i`` (what decoders take)."""
        return _Entry(self, i, silent=False)

    def record(self, i: int, key: str, exc: BaseException | None = None) -> None:
        """File ``i`` met ``key`` ("skipped/..." or "converted/..."): kept if it is the
        file's first reason this epoch."""
        col, cur = self.counter._columns[key], int(self.marks[i])
        # one reason per file: the first, except that a skip outranks a conversion met
        # before it (the file is not used after all)
        skip = key.startswith("skipped/")
        if cur == 0 or (skip and cur - 1 not in self._skip_cols()):
            self.marks[i] = col + 1
            if key.startswith("skipped/") and self._warned < _WARN_FIRST:
                self._warned += 1
                detail = f": {exc!r}" if exc is not None else ""
                log.warning("skipped bad sample %s (%s)%s", self.name(i), key, detail)
        if key.startswith("skipped/"):
            self.bad[i] = True

    def first_good(self, i: int, fetch: Callable[[int, object], object | None]):
        """``fetch(i, counter)`` (None: file i is unusable, its reason given to ``counter``),
        else the same for the next files not known bad, silently: a substitute is recorded
        when its own index comes up."""
        with reading(self.at(i)) as c:
            out = fetch(i, c)
        if out is not None:
            return out
        self.bad[i] = True  # a reader that gave no reason: unusable all the same
        n = len(self)
        j = i + 1
        for _ in range(2):  # from i + 1 to the end, then from 0 to i
            stop = n if j > i else i
            while j < stop:
                cand = (~self.bad[j : min(stop, j + 256)]).nonzero()
                if len(cand) == 0:
                    j = min(stop, j + 256)
                    continue
                j += int(cand[0])
                with reading(_Entry(self, j, silent=True)) as c:
                    out = fetch(j, c)
                if out is not None:
                    return out
                self.bad[j] = True
                j += 1
            j = 0
        raise NoReadableSample(
            f"{self.key}: none of its {n} files can be read (e.g. {self.name(i)}); "
            "see the warnings above for the reasons"
        )

    def counts(self) -> dict[str, int]:
        """{"skipped/<reason>": files, ...} recorded this epoch (reasons met only)."""
        # numpy: a plain read of shared CPU memory (the engine checks it between steps)
        hist = np.bincount(self.marks.numpy().astype(np.int64), minlength=1).tolist()
        keys = {col + 1: k for k, col in self.counter._columns.items()}
        return {keys[c]: n for c, n in enumerate(hist) if c and n}

    def entries(self, limit: int | None = None) -> list[dict[str, str]]:
        """[{"reason": key, "file": name}] of the files recorded this epoch (``limit`` first)."""
        idx = self.marks.nonzero().flatten()[:limit].tolist()
        keys = {col + 1: k for k, col in self.counter._columns.items()}
        return [{"reason": keys[int(self.marks[i])], "file": self.name(i)} for i in idx]

    def reset(self) -> None:
        self.marks.zero_()

    def state(self) -> dict:
        """The epoch's entries, by reason name (for a checkpoint)."""
        idx = self.marks.nonzero().flatten()
        keys = {col + 1: k for k, col in self.counter._columns.items()}
        return {"n": len(self), "index": idx.tolist(),
                "reason": [keys[int(self.marks[i])] for i in idx]}  # fmt: skip

    def restore(self, state: dict) -> None:
        """Put back the entries of :meth:`state` (a reader of another size is left alone)."""
        if int(state.get("n", -1)) != len(self):
            log.warning("%s: the data changed since the checkpoint (%s files, now %d); this "
                        "epoch's bad-file report restarts", self.key, state.get("n"), len(self))  # fmt: skip
            return
        for i, key in zip(state["index"], state["reason"]):
            if key in self.counter._columns:
                self.marks[i] = self.counter._columns[key] + 1
                self.bad[i] = key.startswith("skipped/")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_warned"] = 0
        return d


class _Entry:
    """The counter a decoder sees while file ``i`` is read: records its reason in the book
    (``silent``: only learns that it is unusable, for a substitute)."""

    def __init__(self, book: SampleBook, i: int, silent: bool):
        self.book, self.i, self.silent = book, i, silent

    def count(self, reason: str, what: str = "", exc: BaseException | None = None) -> None:
        key = reason if "/" in reason else self.book.counter._full_key(reason)
        if self.silent:
            if key.startswith("skipped/"):
                self.book.bad[self.i] = True
            return
        self.book.record(self.i, key, exc)
