"""Bad-sample accounting: count what the readers of any modality skipped or converted.

Nothing a reader meets is ever fatal and nothing is silent. A sample that cannot be used
(unreadable, truncated, too small, an unreadable shard member) is *skipped*; a usable one in
an unusual form (a CMYK image, a 96 kHz clip) is *converted*. Both are counted in a
:class:`BadSampleCounter` under a reason. The generic reasons are below; a modality registers
its own with :func:`register_reasons` (the image modality's CMYK, palette, ... live in
``unipred.tasks.image.decode``), and only reasons that occurred are logged, so a run of one
modality never shows another's columns.

The counts live in a small shared-memory tensor, one row per DataLoader worker, so the
numbers that workers record are visible in the main process (where the engine logs them)
without locks: each worker only writes its own row. Typical use by the engine::

    from unipred.data.accounting import COUNTER
    ...  # at the end of each epoch
    counts = COUNTER.snapshot()   # {"skipped/truncated": 3, "converted/cmyk": 1, ...}
    COUNTER.reset()
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref

import torch

log = logging.getLogger(__name__)

_MAX_SLOTS = 129  # main process + up to 128 DataLoader workers (more wrap around)
_MAX_REASONS = 64  # columns of the shared tensor
_WARN_FIRST = 20  # log the first few bad files of each process by name, then only count
# "skipped/<reason>" or "converted/<reason>" -> its column, in registration order
_COLUMNS: dict[str, int] = {}
# "skipped/<reason>" -> the module that registered it (which modality a reason belongs to)
_OWNERS: dict[str, str] = {}


def register_reasons(skipped: tuple[str, ...] = (), converted: tuple[str, ...] = ()) -> None:
    """Declare the reasons a reader counts samples under (idempotent; call at import). The
    calling module is remembered as the reason's owner: a run's data_report.json lists the
    generic reasons and those of the modalities it reads (:func:`reasons_for`)."""
    owner = sys._getframe(1).f_globals.get("__name__", "")
    for kind, names in (("skipped", skipped), ("converted", converted)):
        for name in names:
            key = f"{kind}/{name}"
            _OWNERS.setdefault(key, owner)
            if key not in _COLUMNS:
                if len(_COLUMNS) >= _MAX_REASONS:
                    raise ValueError(f"too many bad-sample reasons (max {_MAX_REASONS})")
                _COLUMNS[key] = len(_COLUMNS)


def modality_of(module: str) -> str:
    """``unipred.tasks.image.decode`` -> ``unipred.tasks.image``; any other core module ->
    ``unipred`` (generic); a plugin's module -> its top-level package."""
    parts = module.split(".")
    if parts[:2] == ["unipred", "tasks"] and len(parts) > 2:
        return ".".join(parts[:3])
    return parts[0]


def reasons_for(modules) -> set[str]:
    """The reasons a run whose data code lives in ``modules`` can meet: the generic ones and
    those registered by the same modalities."""
    mine = {modality_of(m) for m in modules} | {"unipred"}
    return {k for k, owner in _OWNERS.items() if modality_of(owner) in mine}


def data_modules(task) -> set[str]:
    """The modules of ``task``'s data code (its class, its data source; a joint task's
    sources' too)."""
    out = set()
    for t in [task, *(getattr(s, "task", None) for s in getattr(task, "sources", None) or [])]:
        if t is None:
            continue
        out.add(type(t).__module__)
        src = getattr(t, "data_class", None)
        if src is not None:
            out.add(src.__module__)
    return out


# every modality's readers meet these
register_reasons(skipped=("corrupt", "truncated", "tiny", "read_error", "too_large", "empty"))
# shards read over a network (unipred.data.remote): a shard gone for good (404, no progress
# within the deadline) counts its planned samples; repeated = re-read to keep ranks in step
register_reasons(skipped=("shard_gone",), converted=("repeated",))
_NAMES, _NAME_BYTES = 32, 256  # the first bad files of each process slot, kept by name


class BadSampleCounter:
    """Process-shared counts of skipped and converted samples.

    ``count(reason)`` may be called from any DataLoader worker; ``snapshot()`` (in any
    process) sums all workers. The tensor is created in shared memory, so it survives
    fork and is shared (not copied) when a dataset holding the counter is pickled to
    spawned workers.
    """

    def __init__(self):
        # the live registration table: reasons registered later are counted too. A counter
        # pickled to a spawned worker carries a copy, so columns agree whatever that worker
        # imports first
        self._columns = _COLUMNS
        self._t = torch.zeros(_MAX_SLOTS, _MAX_REASONS, dtype=torch.int64).share_memory_()
        # "reason<TAB>file" of the first bad files of each slot (UTF-8, zero padded)
        self._names = torch.zeros(_MAX_SLOTS, _NAMES, _NAME_BYTES, dtype=torch.uint8)
        self._names.share_memory_()
        self._n_names = torch.zeros(_MAX_SLOTS, dtype=torch.int64).share_memory_()
        self._warned = 0
        # the per-file books of map-style readers (unipred.data.book), counted in snapshots;
        # weak: a book lives as long as its reader
        self._books: weakref.WeakSet = weakref.WeakSet()
        self._pending: dict[str, dict] = {}  # book states from a checkpoint, by reader key
        # what streams had counted in the batches a checkpoint's run had trained on, by
        # reader: {"counts": {key: n}, "names": [...]} (restore_stream)
        self._restored: dict[str, dict] = {}

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (_MAX_SLOTS - 1)

    def count(
        self, reason: str, what: str = "", exc: BaseException | None = None, n: int = 1
    ) -> None:
        """Record ``n`` samples (one by default) under a registered ``reason`` ("truncated"
        or "skipped/truncated"); ``what`` names them (a file, a shard URL)."""
        key = reason if "/" in reason else self._full_key(reason)
        if key not in self._columns:
            raise KeyError(f"unknown bad-sample reason {reason!r}; register it with "
                           f"register_reasons(); known: {sorted(self._columns)}")  # fmt: skip
        slot = self._slot()
        self._t[slot, self._columns[key]] += n
        n = int(self._n_names[slot])
        if n < _NAMES:
            raw = f"{key}\t{what or '?'}".encode("utf-8", "replace")[:_NAME_BYTES]
            self._names[slot, n, : len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            self._n_names[slot] = n + 1
        if key.startswith("skipped/") and self._warned < _WARN_FIRST:
            self._warned += 1
            detail = f": {exc!r}" if exc is not None else ""
            log.warning("skipped bad sample %s (%s)%s", what or "?", key, detail)

    def _full_key(self, reason: str) -> str:
        for kind in ("skipped", "converted"):
            if f"{kind}/{reason}" in self._columns:
                return f"{kind}/{reason}"
        raise KeyError(f"unknown bad-sample reason {reason!r}; register it with "
                       f"register_reasons(); known: {sorted(self._columns)}")  # fmt: skip

    def snapshot(self, books: bool = True) -> dict[str, int]:
        """Counts since the last ``reset()`` of every registered reason, summed over all
        workers (and the attached books of map-style readers unless ``books=False``), plus
        ``skipped/total`` and ``converted/total``."""
        # read through numpy: a plain read of shared CPU memory (no torch op, no device)
        sums = self._t.numpy().sum(axis=0).tolist()
        out = {k: int(sums[i]) for k, i in self._columns.items()}
        for book in list(self._books) if books else ():
            for k, v in book.counts().items():
                out[k] = out.get(k, 0) + v
        for part in self._restored.values():
            for k, v in part["counts"].items():
                if k in out:
                    out[k] += v
        for kind in ("skipped", "converted"):
            out[f"{kind}/total"] = sum(v for k, v in out.items() if k.startswith(f"{kind}/"))
        return out

    def bad_files(self, limit: int = 100) -> list[dict[str, str]]:
        """``[{"reason": "skipped/truncated", "file": ...}, ...]`` since the last ``reset()``:
        every file recorded by a map-style reader's book (up to ``limit`` per reader), and
        the first bad samples of every process of the streaming readers (32 per process)."""
        out = []
        for book in list(self._books):
            out += book.entries(limit)
        for part in self._restored.values():
            out += part["names"]
        for slot in range(_MAX_SLOTS):
            for i in range(int(self._n_names[slot])):
                raw = bytes(self._names[slot, i].tolist()).rstrip(b"\0")
                reason, _, name = raw.decode("utf-8", "replace").partition("\t")
                out.append({"reason": reason, "file": name})
        return out

    def reset(self) -> None:
        """Zero every count (call at the start of each epoch, after logging)."""
        self._t.zero_()
        self._names.zero_()
        self._n_names.zero_()
        for book in list(self._books):
            book.reset()
        self._pending.clear()
        self._restored.clear()

    # -- streams: the counts of the batches a checkpoint had trained on ----------------------
    def progress(self) -> torch.Tensor:
        """This process's row and number of names (a stream records it at each batch end)."""
        slot = self._slot()
        return torch.cat([self._t[slot], self._n_names[slot : slot + 1]])

    def consumed(self, rows: list[tuple[int, torch.Tensor]]) -> dict:
        """{"counts", "names"} of the given (worker slot, ``progress()`` at the last batch
        the run trained on) pairs: what a resumed stream will not read again."""
        counts: dict[str, int] = {}
        names: list[dict] = []
        for slot, prog in rows:
            vals = prog.tolist()
            for k, col in self._columns.items():
                if vals[col]:
                    counts[k] = counts.get(k, 0) + int(vals[col])
            for i in range(min(int(vals[-1]), _NAMES)):
                raw = bytes(self._names[slot, i].tolist()).rstrip(b"\0")
                reason, _, name = raw.decode("utf-8", "replace").partition("\t")
                names.append({"reason": reason, "file": name})
        return {"counts": counts, "names": names}

    def restore_stream(self, key: str, part: dict) -> None:
        """Count ``part`` (from :meth:`consumed`, saved in a checkpoint) in this epoch for the
        stream ``key`` (set, not added: a reader built twice counts it once)."""
        self._restored[key] = {"counts": dict(part.get("counts", {})),
                               "names": list(part.get("names", []))}  # fmt: skip

    def begin_run(self) -> None:
        """Forget the readers and counts of earlier runs in this process (a run stopped
        mid-epoch, a notebook's previous ``fit``): a run counts only the readers it builds."""
        # forget the books first: one an earlier `evaluate` built under inference mode holds
        # tensors that cannot be zeroed in place outside it
        self._books = weakref.WeakSet()
        self.reset()

    def attach(self, book) -> None:
        """Count a map-style reader's :class:`~unipred.data.book.SampleBook` in this counter
        (its reader calls this); entries a checkpoint holds for its key are put back."""
        self._books.add(book)
        if book.key in self._pending:
            book.restore(self._pending[book.key])

    def state_dict(self) -> dict:
        """The books' entries of the current epoch, for a checkpoint. Streaming readers need
        none: a resumed stream decodes (and counts) again what it had delivered."""
        return {"books": {b.key: b.state() for b in list(self._books)}}

    def load_state_dict(self, state: dict) -> None:
        """Entries of :meth:`state_dict`, put back into the books of these keys now and into
        readers built later (a resumed run builds its data after loading the checkpoint)."""
        self._pending = dict(state.get("books", {}))
        for book in list(self._books):
            if book.key in self._pending:
                book.restore(self._pending[book.key])

    def handler(self, exn: BaseException) -> bool:
        """A webdataset exception handler: count the error as a skipped sample, go on."""
        what = str(exn.args[-1]) if getattr(exn, "args", None) else ""
        self.count("read_error", what, exn)
        return True

    def __getstate__(self):
        return {"_t": self._t, "_names": self._names, "_n_names": self._n_names, "_warned": 0,
                "_columns": dict(self._columns), "_pending": {}, "_restored": {}}  # fmt: skip

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._books = weakref.WeakSet()  # a worker's copy: books are summed in the parent


class Once:
    """A counter for one sample: only its first reason is counted (a sample counts once,
    under one reason, however many conversions it goes through)."""

    def __init__(self, inner):
        self.inner, self.done = inner, False

    def count(self, reason: str, what: str = "", exc: BaseException | None = None,
              n: int = 1) -> None:  # fmt: skip
        if not self.done:
            self.done = True
            self.inner.count(reason, what, exc, n=n)

    def handler(self, exn: BaseException) -> bool:
        return self.inner.handler(exn)


class SkipSample(ValueError):
    """Raised by a decoder for a sample that must be skipped, with the reason to count it
    under (a key of ``SKIP_REASONS``); any other decoder error counts as ``corrupt``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def reason_of(err: BaseException) -> str:
    """The skip reason a decoder error is counted under."""
    return err.reason if isinstance(err, SkipSample) else "corrupt"


# The process-wide default counter the readers use unless given their own.
COUNTER = BadSampleCounter()

# the counter of the sample being read in this process: a transform that changes a sample's
# content (a colour image greyed for a one-channel model) counts through it, so the count
# carries the file's name and a substitute's conversion is not counted twice
_READING: list = []


@contextlib.contextmanager
def reading(counter):
    """Make ``counter`` the one :func:`note` uses while a sample is read and transformed."""
    _READING.append(counter)
    try:
        yield counter
    finally:
        _READING.pop()


def note(reason: str, what: str = "") -> None:
    """Count ``reason`` for the sample being read (see :func:`reading`), else in COUNTER."""
    (_READING[-1] if _READING else COUNTER).count(reason, what)


def wds_handler(exn: BaseException) -> bool:
    """webdataset handler bound to the process-wide ``COUNTER``."""
    return COUNTER.handler(exn)


def epoch_logs(counter: BadSampleCounter | None = None, reset: bool = True) -> dict[str, int]:
    """``{"data/skipped/truncated": n, ...}`` for the epoch that just ended, then reset."""
    counter = counter or COUNTER
    snap = counter.snapshot()
    if reset:
        counter.reset()
    return {f"data/{k}": v for k, v in snap.items()}


def lightning_callback(counter: BadSampleCounter | None = None, report=None,
                       max_bad_fraction: float | None = None, root: str = ""):  # fmt: skip
    """The engine's bad-sample callback (:class:`unipred.data.epoch_report.BadSampleLogger`):
    per-epoch counts logged and written to ``report``, and the run stopped when more than
    ``max_bad_fraction`` of the training split is unreadable."""
    from unipred.data.epoch_report import BadSampleLogger

    return BadSampleLogger(counter or COUNTER, report, max_bad_fraction, root)


def _gather(names: list, world: int) -> list:
    if world <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return names
    parts = [None] * world
    torch.distributed.all_gather_object(parts, names)
    return [n for part in parts for n in part]


_REPORT_NAMES = 100  # bad files listed per epoch in the report


def write_report(path, epoch: int, step: int, counts: dict, names: list) -> None:
    """Add (or replace) the entry of ``epoch`` in the JSON report at ``path``, atomically."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    data = {"epochs": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a damaged report is rewritten
    seen, first = set(), []
    for n in names:
        if (n["reason"], n["file"]) not in seen and len(first) < _REPORT_NAMES:
            seen.add((n["reason"], n["file"]))
            first.append(n)
    entry = {"epoch": epoch, "global_step": step,
             "counts": {k: v for k, v in counts.items()}, "bad_files": first}  # fmt: skip
    data["epochs"] = [e for e in data.get("epochs", []) if e.get("epoch") != epoch] + [entry]
    data["total"] = {k: sum(e["counts"].get(k, 0) for e in data["epochs"]) for k in counts}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
