"""The run folder is checked before anything is built: a bad ``run_dir`` is one line, not a
traceback minutes into a run.

``check_run_dir(path)`` creates the folder when missing and proves it usable: it is a folder
(not a file, no file in its path), a file can be written, flushed and removed in it (a
read-only mount or a folder without write permission fails here), and its file system has
at least ``MIN_FREE_MB`` free. Each problem raises :class:`RunDirError` (a ``ValueError``:
``unipred fit`` prints it in one line and exits with code 2).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

MIN_FREE_MB = 64  # below this, the first checkpoint or log would not fit


class RunDirError(ValueError):
    """``run_dir`` cannot hold the run (one line naming it and what to change)."""


def _why(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "is on a read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "is not writable (permission denied)"
    if e.errno == errno.ENOSPC:
        return "is on a full disk (no space left)"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "has a file where a folder is needed"
    return f"cannot be written ({e.strerror or e})"


def check_run_dir(path: str | os.PathLike, min_free_mb: float = MIN_FREE_MB) -> Path:
    """Create ``path`` if needed and check it can hold a run (see the module docstring)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"run_dir={p} is a file, not a folder; set run_dir to a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(
            f"run_dir={p}: a part of its path is a file; set another run_dir"
        ) from None
    except OSError as e:
        raise RunDirError(f"run_dir={p} {_why(e)}; set run_dir to a writable folder") from None
    probe = p / f".unipred-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunDirError(f"run_dir={p} {_why(e)}; set run_dir to a writable folder") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free = shutil.disk_usage(p).free / 2**20
    if free < min_free_mb:
        raise RunDirError(
            f"run_dir={p} has {free:.0f} MB free, below the {min_free_mb} MB a run needs for "
            "its checkpoints and logs; free some space or set another run_dir"
        )
    return p


def set_aside_earlier_run(path: str | os.PathLike) -> Path | None:
    """A fresh run (no ``resume``) in a folder that holds an earlier run's checkpoints moves
    them to ``earlier-N/`` and returns that folder (None when there were none).

    Why: the new run overwrites ``last.ckpt`` but not the earlier run's step checkpoints, and
    ``resume=auto`` continues the newest by step, which would then be the earlier run's, not
    this one's. Nothing is deleted: the earlier files keep their names inside ``earlier-N/``."""
    p = Path(path)
    moving = [q for q in (p / "checkpoints", p / "best") if q.is_dir() and any(q.iterdir())]
    moving += sorted(p.glob("hpc_ckpt_*.ckpt"))  # Lightning's SLURM saves, also resumed
    if not moving:
        return None
    n = 1
    while (p / f"earlier-{n}").exists():
        n += 1
    dest = p / f"earlier-{n}"
    dest.mkdir()
    for q in moving:
        q.rename(dest / q.name)
    return dest
