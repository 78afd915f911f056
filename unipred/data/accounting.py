"""Bad-sample accounting: decode images robustly and count what was converted or skipped.

Nothing here is ever fatal and nothing is silent. A sample that cannot be used (not an
image, truncated, too small, unreadable shard member) is *skipped*; a usable image in an
unusual format (CMYK, 16-bit, palette/alpha) is *converted* to 8-bit RGB. Both are counted
in a :class:`BadSampleCounter`. Only conversions that change the content count: a grey image
given to an RGB model is replicated into three equal channels, uncounted; a colour image
given to a one-channel model (``in_chans: 1``) loses its colour and counts as
``converted/color_to_gray``.

The counts live in a small shared-memory tensor, one row per DataLoader worker, so the
numbers that workers record are visible in the main process (where the engine logs them)
without locks: each worker only writes its own row. Typical use by the engine::

    from unipred.data.accounting import COUNTER
    ...  # at the end of each epoch
    counts = COUNTER.snapshot()   # {"skipped/truncated": 3, "converted/cmyk": 1, ...}
    COUNTER.reset()
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# order matters: it indexes the columns of the shared tensor
SKIP_REASONS = ("corrupt", "truncated", "tiny", "read_error", "too_large", "empty")
CONVERT_REASONS = ("color_to_gray", "cmyk", "high_bit_depth", "palette_or_alpha", "other_mode",
                   "resampled", "silent", "wrong_extension")  # fmt: skip
KEYS = tuple(f"skipped/{r}" for r in SKIP_REASONS) + tuple(
    f"converted/{r}" for r in CONVERT_REASONS
)
_MAX_SLOTS = 129  # main process + up to 128 DataLoader workers (more wrap around)
_WARN_FIRST = 20  # log the first few bad files of each process by name, then only count
# images whose header claims more pixels than this are skipped before decoding (a
# decompression bomb: a few bytes that would decode to gigabytes); PIL's own check only warns
# below twice its limit, this one refuses at its limit
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_NAMES, _NAME_BYTES = 8, 256  # the first bad files of each process slot, kept by name


class BadSampleCounter:
    """Process-shared counts of skipped and converted samples.

    ``count(reason)`` may be called from any DataLoader worker; ``snapshot()`` (in any
    process) sums all workers. The tensor is created in shared memory, so it survives
    fork and is shared (not copied) when a dataset holding the counter is pickled to
    spawned workers.
    """

    def __init__(self):
        self._t = torch.zeros(_MAX_SLOTS, len(KEYS), dtype=torch.int64).share_memory_()
        # "reason<TAB>file" of the first bad files of each slot (UTF-8, zero padded)
        self._names = torch.zeros(_MAX_SLOTS, _NAMES, _NAME_BYTES, dtype=torch.uint8)
        self._names.share_memory_()
        self._n_names = torch.zeros(_MAX_SLOTS, dtype=torch.int64).share_memory_()
        self._warned = 0

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (_MAX_SLOTS - 1)

    def count(self, reason: str, what: str = "", exc: BaseException | None = None) -> None:
        """Record one sample: ``reason`` is a key of ``KEYS`` or its short form."""
        key = reason if "/" in reason else _full_key(reason)
        slot = self._slot()
        self._t[slot, KEYS.index(key)] += 1
        n = int(self._n_names[slot])
        if n < _NAMES:
            raw = f"{key}\t{what or '?'}".encode("utf-8", "replace")[:_NAME_BYTES]
            self._names[slot, n, : len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            self._n_names[slot] = n + 1
        if key.startswith("skipped/") and self._warned < _WARN_FIRST:
            self._warned += 1
            detail = f": {exc!r}" if exc is not None else ""
            log.warning("skipped bad sample %s (%s)%s", what or "?", key, detail)

    def snapshot(self) -> dict[str, int]:
        """Counts since the last ``reset()``, summed over all workers, plus totals."""
        sums = self._t.sum(dim=0).tolist()
        out = {k: int(v) for k, v in zip(KEYS, sums)}
        out["skipped/total"] = sum(out[f"skipped/{r}"] for r in SKIP_REASONS)
        out["converted/total"] = sum(out[f"converted/{r}"] for r in CONVERT_REASONS)
        return out

    def bad_files(self) -> list[dict[str, str]]:
        """``[{"reason": "skipped/truncated", "file": ...}, ...]``: the first few bad files
        of every process since the last ``reset()`` (up to 8 per process)."""
        out = []
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

    def handler(self, exn: BaseException) -> bool:
        """A webdataset exception handler: count the error as a skipped sample, go on."""
        what = str(exn.args[-1]) if getattr(exn, "args", None) else ""
        self.count("read_error", what, exn)
        return True

    def __getstate__(self):
        return {"_t": self._t, "_names": self._names, "_n_names": self._n_names, "_warned": 0}


class SkipSample(ValueError):
    """Raised by a decoder for a sample that must be skipped, with the reason to count it
    under (a key of ``SKIP_REASONS``); any other decoder error counts as ``corrupt``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def reason_of(err: BaseException) -> str:
    """The skip reason a decoder error is counted under."""
    return err.reason if isinstance(err, SkipSample) else "corrupt"


def _full_key(reason: str) -> str:
    if reason in SKIP_REASONS:
        return f"skipped/{reason}"
    if reason in CONVERT_REASONS:
        return f"converted/{reason}"
    raise KeyError(f"unknown bad-sample reason {reason!r}; known: {list(KEYS)}")


# The process-wide default counter the readers use unless given their own.
COUNTER = BadSampleCounter()


def wds_handler(exn: BaseException) -> bool:
    """webdataset handler bound to the process-wide ``COUNTER``."""
    return COUNTER.handler(exn)


def decode_image(
    data: bytes,
    what: str = "",
    min_size: int = 8,
    counter: BadSampleCounter | None = None,
) -> Image.Image | None:
    """Bytes -> an 8-bit RGB PIL image, or None if the sample must be skipped.

    Skipped (and counted): not an image, truncated data, either side < ``min_size`` px, a
    header claiming more than ``MAX_PIXELS`` pixels (judged before decoding).
    Converted (and counted): CMYK, 16-bit / float, palette or alpha images. Grayscale is
    replicated to RGB without being counted (nothing about the image changes).
    Truncated files are never padded with grey (PIL's LOAD_TRUNCATED_IMAGES stays off).
    """
    counter = counter or COUNTER
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", palette transparency
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w * h > MAX_PIXELS:
                counter.count("too_large", what, ValueError(f"header claims {w}x{h} pixels"))
                return None
            img.load()
    except Image.DecompressionBombError as e:  # PIL refuses > 2 x its limit while opening
        counter.count("too_large", what, e)
        return None
    except UnidentifiedImageError as e:
        counter.count("corrupt", what, e)
        return None
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
        counter.count(reason, what, e)
        return None
    except Exception as e:  # decoders raise many types on garbage; never fatal
        counter.count("corrupt", what, e)
        return None
    if min(img.size) < min_size:
        counter.count("tiny", what)
        return None
    return to_rgb(img, what, counter)


def to_rgb(img: Image.Image, what: str = "", counter: BadSampleCounter | None = None):
    """Convert any PIL mode to 8-bit RGB, counting the conversions that change the content."""
    counter = counter or COUNTER
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1"):  # lossless: three equal channels, not a "problem"
        return img.convert("RGB")
    if mode == "CMYK":
        counter.count("cmyk", what)
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        counter.count("high_bit_depth", what)
        return _high_bit_to_rgb(img)
    if mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        counter.count("palette_or_alpha", what)
        rgba = img.convert("RGBA")
        # alpha is composited on white: converting straight to RGB would expose whatever
        # colour the transparent pixels happen to hold
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    counter.count("other_mode", what)
    return img.convert("RGB")


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit int / float grayscale -> 8-bit RGB by scaling, not clipping.

    PIL's own ``convert("RGB")`` clips values above 255, which turns most 16-bit images
    white; here the full 16-bit range (or [0, 1] for float images) maps to [0, 255].
    """
    a = np.asarray(img)
    if a.dtype.kind == "f":
        hi = 1.0 if float(np.nanmax(a)) <= 1.0 else 255.0
        a8 = np.clip(np.nan_to_num(a) / hi * 255.0, 0, 255).astype(np.uint8)
    else:
        # "I;16*" is 16-bit by definition; plain "I" (32-bit) is judged by its values
        sixteen = img.mode.startswith("I;16") or int(a.max(initial=0)) > 255
        hi = 65535 if sixteen else 255
        a8 = np.clip(a.astype(np.int64) * 255 // hi, 0, 255).astype(np.uint8)
    if a8.ndim == 3:
        a8 = a8[..., 0]
    return Image.fromarray(a8, mode="L").convert("RGB")


def epoch_logs(counter: BadSampleCounter | None = None, reset: bool = True) -> dict[str, int]:
    """``{"data/skipped/truncated": n, ...}`` for the epoch that just ended, then reset."""
    counter = counter or COUNTER
    snap = counter.snapshot()
    if reset:
        counter.reset()
    return {f"data/{k}": v for k, v in snap.items()}


def lightning_callback(counter: BadSampleCounter | None = None, report=None):
    """A Lightning callback that logs the bad-sample counts at the end of every training
    epoch, summed over DataLoader workers (shared memory) and ranks (Lightning's
    ``sync_dist`` sum), then resets them. With ``report`` (a path, e.g.
    ``RUN_DIR/data_report.json``) global rank 0 also writes the summed counts and the first
    names of bad files of every rank there, one entry per epoch."""
    import lightning as L

    class BadSampleLogger(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            c = counter or COUNTER
            snap, names = c.snapshot(), c.bad_files()
            c.reset()
            for k, v in snap.items():  # this rank's counts; Lightning sums them over ranks
                pl_module.log(f"data/{k}", float(v), sync_dist=True, reduce_fx="sum")
            if report is None:
                return
            t = torch.tensor(list(snap.values()), dtype=torch.float64, device=pl_module.device)
            total = dict(
                zip(snap, (int(v) for v in trainer.strategy.reduce(t, reduce_op="sum").tolist()))
            )
            names = _gather(names, trainer.world_size)
            if trainer.is_global_zero:
                write_report(report, trainer.current_epoch, trainer.global_step, total, names)
                if total["skipped/total"] + total["converted/total"]:
                    log.info("epoch %d bad samples (all ranks): %s; names in %s",
                             trainer.current_epoch, {k: v for k, v in total.items() if v}, report)  # fmt: skip

    return BadSampleLogger()


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
