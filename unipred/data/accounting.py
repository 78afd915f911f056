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
SKIP_REASONS = ("corrupt", "truncated", "tiny", "read_error")
CONVERT_REASONS = ("color_to_gray", "cmyk", "high_bit_depth", "palette_or_alpha", "other_mode")
KEYS = tuple(f"skipped/{r}" for r in SKIP_REASONS) + tuple(
    f"converted/{r}" for r in CONVERT_REASONS
)
_MAX_SLOTS = 129  # main process + up to 128 DataLoader workers (more wrap around)
_WARN_FIRST = 20  # log the first few bad files of each process by name, then only count


class BadSampleCounter:
    """Process-shared counts of skipped and converted samples.

    ``count(reason)`` may be called from any DataLoader worker; ``snapshot()`` (in any
    process) sums all workers. The tensor is created in shared memory, so it survives
    fork and is shared (not copied) when a dataset holding the counter is pickled to
    spawned workers.
    """

    def __init__(self):
        self._t = torch.zeros(_MAX_SLOTS, len(KEYS), dtype=torch.int64).share_memory_()
        self._warned = 0

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (_MAX_SLOTS - 1)

    def count(self, reason: str, what: str = "", exc: BaseException | None = None) -> None:
        """Record one sample: ``reason`` is a key of ``KEYS`` or its short form."""
        key = reason if "/" in reason else _full_key(reason)
        self._t[self._slot(), KEYS.index(key)] += 1
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

    def reset(self) -> None:
        """Zero every count (call at the start of each epoch, after logging)."""
        self._t.zero_()

    def handler(self, exn: BaseException) -> bool:
        """A webdataset exception handler: count the error as a skipped sample, go on."""
        what = str(exn.args[-1]) if getattr(exn, "args", None) else ""
        self.count("read_error", what, exn)
        return True

    def __getstate__(self):
        return {"_t": self._t, "_warned": 0}


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

    Skipped (and counted): not an image, truncated data, either side < ``min_size`` px.
    Converted (and counted): CMYK, 16-bit / float, palette or alpha images. Grayscale is
    replicated to RGB without being counted (nothing about the image changes).
    Truncated files are never padded with grey (PIL's LOAD_TRUNCATED_IMAGES stays off).
    """
    counter = counter or COUNTER
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", palette transparency
            img = Image.open(io.BytesIO(data))
            img.load()
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


def lightning_callback(counter: BadSampleCounter | None = None):
    """A Lightning callback that logs the bad-sample counts (summed over ranks) at the end
    of every training epoch and resets them; for ``engine.fit(cfg, callbacks=[...])``."""
    import lightning as L

    class BadSampleLogger(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            logs = epoch_logs(counter)
            t = torch.tensor(list(logs.values()), dtype=torch.float64, device=pl_module.device)
            t = trainer.strategy.reduce(t, reduce_op="sum")
            for k, v in zip(logs, t.tolist()):
                pl_module.log(k, float(v), rank_zero_only=True)
            if trainer.is_global_zero and logs["data/skipped/total"] + logs["data/converted/total"]:
                log.info("epoch %d bad samples (this rank): %s", trainer.current_epoch, logs)

    return BadSampleLogger()
