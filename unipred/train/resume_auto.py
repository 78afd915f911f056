"""``resume=auto``: which checkpoint of a run folder to continue from.

The rule (docs/faults.md): the newest checkpoint that loads and matches the model. Files that
cannot be resumed are never started over and never overwritten: an unsafe (code-carrying),
damaged or mismatched file is skipped with a warning and set aside under a new name; a FIFO,
a directory named ``.ckpt`` or an unreadable file is skipped with a warning without being
opened (a FIFO would block forever); when files exist but none can be resumed the run stops
in one line.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from unipred.train.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    _regular_file,
    check_state_dict,
    read_checkpoint,
)
from unipred.train.sharded import is_sharded


def find_resume_checkpoint(run_dir: str | os.PathLike, model_state: dict | None = None):
    """The checkpoint ``resume=auto`` continues: the newest (by global step, then time) of
    ``run_dir/checkpoints/*.ckpt`` and Lightning's SLURM ``run_dir/hpc_ckpt_*.ckpt`` that
    loads and, given ``model_state``, matches the model. None when there is none at all.

    Only regular files are opened: a FIFO, a directory named ``.ckpt`` or a file that cannot
    be opened is skipped with a warning, never waited on. A file that is unsafe (carries
    code), damaged or made for another model is skipped with a warning naming it, and renamed
    ``NAME.unsafe`` / ``.damaged`` / ``.mismatched`` so that the resumed run never overwrites
    it. When checkpoints exist but none can be resumed, CheckpointError: the run stops rather
    than start over them."""
    folder = Path(run_dir) / "checkpoints"
    # hpc_ckpt_*.ckpt: what Lightning saves on SLURM's pre-emption signal before requeueing
    cands = [*folder.glob("*.ckpt"), *Path(run_dir).glob("hpc_ckpt_*.ckpt")]
    cands = [p for p in cands if not p.name.startswith(".")]
    usable, refused, notes = [], [], []
    for p in cands:
        try:
            # a sharded checkpoint (trainer.strategy=fsdp2) is a folder; any other one a file
            st = p.stat() if is_sharded(p) else _regular_file(p)
            if not os.access(p, os.R_OK):
                raise CheckpointError(f"{p}: cannot be opened (permission denied)")
        except CheckpointError as e:
            notes.append(str(e))  # not a file we can read: left where it is
            continue
        try:
            ckpt = read_checkpoint(p, require_training_state=True, shapes_only=True)
            if model_state is not None:
                check_state_dict(p, ckpt["state_dict"], model_state)
        except UnsafeCheckpointError as e:
            refused.append((p, "unsafe", str(e)))
            continue
        except CheckpointError as e:
            kind = "mismatched" if model_state is not None and _is_mismatch(e) else "damaged"
            refused.append((p, kind, str(e)))
            continue
        usable.append((int(ckpt["global_step"]), st.st_mtime, p))
        del ckpt
    for n in notes:
        warnings.warn(f"resume=auto skips {n}", stacklevel=2)
    if not usable:
        if refused:
            p, kind, why = max(refused, key=lambda r: _mtime(r[0]))
            raise CheckpointError(
                f"resume=auto: no checkpoint in {folder} can be resumed (newest: {why}); "
                "refusing to start over it: move the files away or set resume=PATH"
            )
        return None
    step, _, best = max(usable)
    for p, kind, why in refused:
        kept = _set_aside(p, kind)
        warnings.warn(f"resume=auto skips {why}; kept as {kept.name}", stacklevel=2)
    if refused or notes:
        warnings.warn(f"resume=auto: resuming from {best} (step {step})", stacklevel=2)
    return best


def _is_mismatch(e: CheckpointError) -> bool:
    msg = str(e)
    return (
        "(the model expects it)" in msg or "the model expects" in msg or "not in the model" in msg
    )


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _set_aside(p: Path, kind: str) -> Path:
    """Rename a refused checkpoint ``NAME.KIND`` (``NAME.KIND.N`` if taken), so the resumed
    run's saves never overwrite it."""
    for n in range(1000):
        new = p.with_name(f"{p.name}.{kind}" + (f".{n}" if n else ""))
        if not new.exists():
            try:
                os.replace(p, new)
            except FileNotFoundError:  # another rank set it aside first
                pass
            return new
    return p
