"""Checkpoints: atomic writes, periodic + last.ckpt saving, resume=auto, strict key checks.

A checkpoint is Lightning's dict plus ``ema_state_dict`` (the EMA weights), ``unipred_config``
(the run config) and ``rng`` (torch/python RNG states, so a resumed run repeats the uninterrupted
one exactly). Files are written to a temporary name in the same folder, fsynced and renamed, so
a crash mid-write never leaves a truncated ``last.ckpt``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

REQUIRED = ("state_dict", "global_step", "loops", "optimizer_states")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the first bad key."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to ``path`` via a temporary file + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, path)


def read_checkpoint(path: str | os.PathLike, require_training_state: bool = False) -> dict:
    """Load a checkpoint on CPU; raise CheckpointError naming the file when it is unusable."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # truncated/corrupt files raise many different errors
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(ckpt).__name__})")
    need = REQUIRED if require_training_state else ("state_dict",)
    for k in need:
        if k not in ckpt:
            raise CheckpointError(f"{path}: missing key '{k}'")
    return ckpt


def check_state_dict(path, got: dict, want: dict, allow_missing=()) -> None:
    """Compare a checkpoint's state dict with a model's; raise naming the first bad key."""
    for k, v in want.items():
        if k not in got:
            if not any(re.search(p, k) for p in allow_missing):
                raise CheckpointError(f"{path}: missing key '{k}' (the model expects it)")
        elif tuple(got[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: key '{k}' has shape {tuple(got[k].shape)}, the model expects {tuple(v.shape)}"
            )
    for k in got:
        if k not in want:
            raise CheckpointError(f"{path}: unexpected key '{k}' (not in the model)")


def _step_of(p: Path) -> int:
    m = re.search(r"step(\d+)", p.name)
    return int(m.group(1)) if m else -1


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest readable checkpoint of ``run_dir/checkpoints`` (and Lightning's SLURM
    ``run_dir/hpc_ckpt_*.ckpt``), by global step, then time; unreadable ones are skipped with a
    warning."""
    folder = Path(run_dir) / "checkpoints"
    # hpc_ckpt_*.ckpt: what Lightning saves on SLURM's pre-emption signal before requeueing
    cands = [*folder.glob("*.ckpt"), *Path(run_dir).glob("hpc_ckpt_*.ckpt")]
    cands = [p for p in cands if not p.name.startswith(".")]
    cands.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    best, best_step = None, -1
    for p in cands:
        try:
            ckpt = read_checkpoint(p, require_training_state=True)
        except CheckpointError as e:
            warnings.warn(f"resume=auto skips {e}", stacklevel=2)
            continue
        step = int(ckpt["global_step"])
        if step > best_step:
            best, best_step = p, step
        del ckpt
    return best


class PeriodicCheckpoint(Callback):
    """Save ``stepNNNNNNNN.ckpt`` every N optimizer steps (keeping the newest ``keep``), and
    ``last.ckpt`` at the same times and at the end of every epoch and of training."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int, keep: int = 2):
        self.dir, self.every, self.keep = Path(dirpath), every_n_steps, keep
        self._last_saved = -1

    def _save(self, trainer, step_file: bool) -> None:
        step = trainer.global_step
        if step == self._last_saved and not step_file:
            return
        if step_file:
            trainer.save_checkpoint(self.dir / f"step{step:08d}.ckpt", weights_only=False)
            if trainer.is_global_zero:
                old = sorted(self.dir.glob("step*.ckpt"), key=_step_of)[: -self.keep or None]
                for p in old if self.keep > 0 else []:
                    p.unlink(missing_ok=True)
        trainer.save_checkpoint(self.dir / "last.ckpt", weights_only=False)
        self._last_saved = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and step != self._last_saved:
            self._save(trainer, step_file=True)

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer, step_file=False)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, step_file=False)


# ------------------------------------------------------------------------ loading weights
def _strip(sd: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def validate_resume(path, lit) -> dict:
    """Check that a training checkpoint fits the LightningModule before Lightning loads it."""
    ckpt = read_checkpoint(path, require_training_state=True)
    check_state_dict(path, ckpt["state_dict"], lit.state_dict())
    return ckpt


def load_weights(model, path) -> dict | None:
    """Load the raw weights of one of our checkpoints into ``model`` (strict, keys checked);
    return its EMA state dict (or None)."""
    ckpt = read_checkpoint(path)
    sd = _strip(ckpt["state_dict"])
    check_state_dict(path, sd, model.state_dict())
    model.load_state_dict(sd)
    return ckpt.get("ema_state_dict")


def load_backbone(model, sd: dict, source) -> None:
    """The release's pretrain -> classifier conversion: copy every backbone tensor; new QK-norm
    weights start at 1 (bias 0), the classifier is zeroed, fc_norm keeps its init."""
    want = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    for k, v in sd.items():
        if k not in want:
            raise CheckpointError(f"{source}: unexpected key '{k}' (not in the model)")
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(
                f"{source}: key '{k}' has shape {tuple(v.shape)}, the model "
                f"expects {tuple(want[k].shape)}"
            )
    missing = [k for k in want if k not in sd]
    bad = [k for k in missing if not (k.startswith("head.") or "q_norm." in k or "k_norm." in k)]
    if bad:
        raise CheckpointError(f"{source}: missing key '{bad[0]}' (the model expects it)")
    model.load_state_dict(sd, strict=False)
    new = ", ".join(sorted({k.rsplit(".", 1)[0] + ".*" for k in missing})) or "none"
    print(f"model.init: loaded {source}: {len(sd)} tensors matched, {len(missing)} new ({new})")
    with torch.no_grad():
        for k in missing:
            t = model.get_parameter(k) if k in dict(model.named_parameters()) else None
            if t is None:
                continue
            if "q_norm." in k or "k_norm." in k:
                t.fill_(1.0 if k.endswith("weight") else 0.0)
            elif k.startswith("head.classifier."):
                t.zero_()


def apply_init(model, spec: str) -> None:
    """Initialise ``model`` from ``model.init``: official:PATH | ckpt:PATH | pretrain:PATH[:ema]."""
    kind, _, path = spec.partition(":")
    if kind == "ckpt":
        load_weights(model, path)
        print(f"model.init: loaded {path}: all {len(model.state_dict())} tensors matched, 0 new")
    elif kind == "official":
        from unipred.hub import load_official_nepa

        src = load_official_nepa(path).state_dict()
        head = {k: tuple(v.shape) for k, v in src.items() if k.startswith("head.")}
        mine = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("head.")}
        if head and head == mine:  # a released classifier evaluates with its own head
            model.load_state_dict(src, strict=True)
            print(f"model.init: loaded {path}: all {len(src)} tensors matched, 0 new")
        else:
            load_backbone(model, src, path)
    elif kind == "pretrain":
        use_ema = path.endswith(":ema")
        path = path[: -len(":ema")] if use_ema else path
        ckpt = read_checkpoint(path)
        if use_ema and "ema_state_dict" not in ckpt:
            raise CheckpointError(f"{path}: missing key 'ema_state_dict' (asked for :ema)")
        load_backbone(
            model, ckpt["ema_state_dict"] if use_ema else _strip(ckpt["state_dict"]), path
        )
    else:
        raise ValueError(
            f"model.init: unknown kind {kind!r} in {spec!r}; use official:PATH, "
            "ckpt:PATH or pretrain:PATH[:ema]"
        )
