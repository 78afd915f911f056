"""Checkpoints: atomic writes, periodic + last.ckpt saving, resume=auto, strict key checks,
and safe loading.

A checkpoint is Lightning's dict plus ``ema_state_dict`` (the EMA weights), ``unipred_config``
(the run config) and ``rng`` (torch/python RNG states, so a resumed run repeats the uninterrupted
one exactly). Files are written to a temporary name in the same folder, fsynced and renamed, so
a crash mid-write never leaves a truncated ``last.ckpt``.

Every checkpoint unipred reads (``model.init=ckpt:/pretrain:``, ``eval ckpt=``, resume, hub
``.bin`` files, visualize, Lightning's own restore through :class:`AtomicCheckpointIO`) goes
through :func:`safe_load`: ``torch.load(weights_only=True)``, which rebuilds tensors, numbers,
strings and containers only and refuses any other object a pickle names, so a checkpoint
carrying code is refused (:class:`UnsafeCheckpointError`, one line naming the file and the
object) before anything in it runs.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unipred.train.formats import INIT_SOURCES, STATE_ADAPTERS

REQUIRED = ("state_dict", "global_step", "loops", "optimizer_states")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the first bad key."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names objects outside the allow-list (it could run code)."""


# Objects beyond torch's weights-only defaults (tensors, dtypes, numbers, strings, None and
# containers) that unipred's own checkpoints hold. Empty: Lightning's loop/callback states,
# optimizer and LambdaLR states, EMA weights, the run config (plain dicts), the recipe and the
# torch/python RNG states are all plain data (tests/test_faults.py loads the checkpoints of
# pretraining and classification runs this way). Add a type here only if a checkpoint of
# ours needs it, never a callable.
SAFE_GLOBALS: list = []


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    if "weights_only" in text or "Weights only" in text:
        # torch's advice to load with weights_only=False is never ours to give
        return "its pickle could not be read"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _regular_file(path: Path) -> os.stat_result:
    """stat ``path``; CheckpointError unless it is a regular file (a FIFO would block the
    open forever, a directory or device is no checkpoint)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
                stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}  # fmt: skip
        what = next((v for f, v in kind.items() if f(st.st_mode)), "a special file")
        raise CheckpointError(f"{path}: not a regular file ({what})")
    return st


def safe_load(path: str | os.PathLike, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU (memory-mapped when the format allows);
    raises :class:`UnsafeCheckpointError` for a pickle naming anything outside the allow-list
    and :class:`CheckpointError` for an unreadable file, each one line naming ``path``.

    Which of the two is decided from the pickle's opcodes (:mod:`unipred.train.pickle_scan`), not
    from torch's wording, which changes between releases."""
    path = Path(path)
    _regular_file(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:  # a legacy (non-zip) file cannot be memory-mapped
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except PermissionError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        from unipred.train.pickle_scan import unsafe_globals

        try:
            unsafe = unsafe_globals(path, SAFE_GLOBALS)
        except OSError:
            unsafe = []
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused: holds Python objects that could run code; unipred loads "
                f"tensors only (its pickle asks for {', '.join(unsafe[:3])}; nothing in it "
                "was run)"
            ) from None
        raise CheckpointError(
            f"{path}: damaged or not a torch checkpoint ({type(e).__name__}: {_one_line(e)}); "
            "nothing in it was run"
        ) from None


class DiskFullError(OSError):
    """A checkpoint write ran out of space; the message says which checkpoint is intact."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it chains is ENOSPC/EDQUOT (torch's zip writer reports
    a full disk as a RuntimeError of its own, with the OSError inside)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _intact(path: Path) -> str:
    """Which checkpoint a failed write of ``path`` left intact: ``path`` itself, else the
    folder's ``last.ckpt`` (a failed step file)."""
    for p in (path, path.with_name("last.ckpt")):
        try:
            step = safe_load(p).get("global_step")
        except (CheckpointError, AttributeError):
            continue
        return f"the previous checkpoint {p.name} (step {step}) is intact"
    return "no earlier checkpoint was written there"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to ``path`` via a temporary file + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if _disk_full(e):
            tmp.unlink(missing_ok=True)
            raise DiskFullError(f"no space left on device at {path}; {_intact(path)}") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _remove_dead_temporaries(path: Path) -> None:
    """Delete ``.NAME.tmp-PID`` files of ``path`` left by writers that were killed mid-write
    (SIGKILL skips the cleanup); a temporary of a live process is left alone."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            if pid != os.getpid():
                os.kill(pid, 0)  # raises if no such process
                continue
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue  # not ours, or a process we may not signal (alive)
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """Lightning's restore (``trainer.fit(ckpt_path=...)``): always weights-only."""
        return safe_load(path)


def read_checkpoint(
    path: str | os.PathLike, require_training_state: bool = False, shapes_only: bool = False
) -> dict:
    """Load a checkpoint on CPU; raise CheckpointError naming the file (and the key) when it
    is unusable: not a dict, a key missing, or a key holding the wrong kind of value.

    A sharded checkpoint folder (``trainer.strategy=fsdp2``, unipred.train.sharded) is read
    into the same dict, its tensors unsharded; ``shapes_only`` reads its tensors' shapes only
    (meta tensors: enough to check a model against it)."""
    path = Path(path)
    from unipred.train.sharded import is_sharded, read_sharded

    if is_sharded(path):
        ckpt = read_sharded(path, tensors=not shapes_only)
        if require_training_state and "optimizer_states" not in ckpt:
            raise CheckpointError(f"{path}: missing key 'optimizer_states'")
        _check_contents(path, ckpt)
        return ckpt
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(ckpt).__name__})")
    need = REQUIRED if require_training_state else ("state_dict",)
    for k in need:
        if k not in ckpt:
            raise CheckpointError(f"{path}: missing key '{k}'")
    _check_contents(path, ckpt)
    return ckpt


def _check_contents(path: Path, ckpt: dict) -> None:
    """The kinds of value unipred reads from a checkpoint, so a malformed one fails here in
    one line rather than deep inside Lightning."""
    for key in ("state_dict", "ema_state_dict"):
        if key not in ckpt or (key == "ema_state_dict" and ckpt[key] is None):
            continue
        sd = ckpt[key]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: key '{key}' holds {type(sd).__name__}, not a dict")
        for k, v in sd.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise CheckpointError(
                    f"{path}: key '{key}' -> {k!r} holds {type(v).__name__}, not a tensor"
                )
    if "global_step" in ckpt:
        step = ckpt["global_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(
                f"{path}: key 'global_step' holds {step!r} ({type(step).__name__}), not a "
                "step count"
            )
    kinds = {"optimizer_states": list, "loops": dict, "lr_schedulers": list, "callbacks": dict}
    for key, kind in kinds.items():
        if key in ckpt and not isinstance(ckpt[key], kind):
            raise CheckpointError(
                f"{path}: key '{key}' holds {type(ckpt[key]).__name__}, not a {kind.__name__}"
            )
    for i, opt in enumerate(ckpt.get("optimizer_states", [])):
        if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict):
            raise CheckpointError(f"{path}: key 'optimizer_states' -> {i} is no optimizer state")


def non_finite_key(sd: dict) -> str | None:
    """The first key of a state dict whose floating tensor holds NaN or inf, else None."""
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            return k
    return None


def refuse_non_finite(path, sd: dict) -> None:
    """CheckpointError naming the key when weights about to initialise a model are NaN/inf."""
    k = non_finite_key(sd)
    if k is not None:
        raise CheckpointError(
            f"{path}: key '{k}' holds NaN or infinite values (a diverged run?); a model is "
            "never initialised from them"
        )


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


def find_resume_checkpoint(run_dir: str | os.PathLike, model_state: dict | None = None):
    """The checkpoint ``resume=auto`` continues (or None): see
    :func:`unipred.train.resume_auto.find_resume_checkpoint`."""
    from unipred.train.resume_auto import find_resume_checkpoint as find

    return find(run_dir, model_state)


class PeriodicCheckpoint(Callback):
    """Save ``stepNNNNNNNN.ckpt`` every N optimizer steps (keeping the newest ``keep``), and
    ``last.ckpt`` at the same times, at the end of every epoch (after its last batch) and of
    training."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int, keep: int = 2):
        self.dir, self.every, self.keep = Path(dirpath), every_n_steps, keep
        self._last_saved = -1

    def _save(self, trainer, step_file: bool) -> None:
        from unipred.train.sharded import remove_checkpoint

        step = trainer.global_step
        if step == self._last_saved and not step_file:
            return
        if step_file:
            trainer.save_checkpoint(self.dir / f"step{step:08d}.ckpt", weights_only=False)
            if trainer.is_global_zero:
                old = sorted(self.dir.glob("step*.ckpt"), key=_step_of)[: -self.keep or None]
                for p in old if self.keep > 0 else []:
                    remove_checkpoint(p)  # a file, or a sharded checkpoint's folder
        trainer.save_checkpoint(self.dir / "last.ckpt", weights_only=False)
        self._last_saved = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and step != self._last_saved:
            self._save(trainer, step_file=True)
        elif step > 0 and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # the epoch's end is saved here, after its last batch, where Lightning's loop state
            # and the loader's position agree. Saved from on_train_epoch_end, the loops say
            # "epoch E, not completed" while the loader says "epoch E consumed": a resume ran
            # one batch of epoch E+1 as part of E and every later epoch one ahead (found by
            # SIGKILL between an epoch end and the next step checkpoint)
            self._save(trainer, step_file=False)

    def on_train_epoch_end(self, trainer, pl_module):
        # only when the last batch was not known as such (an epoch cut by
        # limit_train_batches); normally saved at the end of the last batch
        self._save(trainer, step_file=False)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, step_file=False)


class Preemption(Callback):
    """SIGTERM or SIGUSR1 (what SLURM sends before the time limit) -> ``last.ckpt``, then stop.

    SIGTERM is Lightning's: its handler marks the trainer, and its loops raise
    ``SIGTERMException`` on every rank together (after a broadcast under DDP) once the current
    batch has completed. Here ``on_exception`` then writes ``last.ckpt`` (all ranks take part,
    as any save) before the process exits. SIGUSR1 is turned into that same path; under a
    SLURM job with auto-requeue Lightning keeps SIGUSR1 for itself (``hpc_ckpt_N.ckpt`` plus
    ``scontrol requeue``; ``resume=auto`` also finds those files)."""

    def __init__(self, dirpath: str | os.PathLike):
        self.dir = Path(dirpath)
        self.stopped_at: int | None = None
        self._previous = None

    def setup(self, trainer, pl_module, stage):
        import signal

        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = getattr(trainer.strategy, "cluster_environment", None)
        slurm = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if stage != "fit" or slurm or not hasattr(signal, "SIGUSR1"):
            return
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGUSR1, _sigusr1_to_sigterm)

    def teardown(self, trainer, pl_module, stage):
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def on_exception(self, trainer, pl_module, exception):
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.dir / "last.ckpt", weights_only=False)
            self.stopped_at = trainer.global_step


def _sigusr1_to_sigterm(signum, frame):
    import signal

    os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM handling takes it from here


# ------------------------------------------------------------------------ loading weights
def _strip(sd: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def validate_resume(path, lit) -> dict:
    """Check that a training checkpoint fits the LightningModule before Lightning loads it."""
    ckpt = read_checkpoint(path, require_training_state=True, shapes_only=True)
    check_state_dict(path, ckpt["state_dict"], lit.state_dict())
    return ckpt


def load_weights(model, path) -> dict | None:
    """Load the raw weights of one of our checkpoints into ``model`` (strict, keys checked);
    return its EMA state dict (or None)."""
    ckpt = read_checkpoint(path)
    sd = _strip(ckpt["state_dict"])
    check_state_dict(path, sd, model.state_dict())
    refuse_non_finite(path, sd)
    model.load_state_dict(sd)
    return ckpt.get("ema_state_dict")


def load_backbone(model, sd: dict, source) -> None:
    """The release's pretrain -> classifier conversion: copy every backbone tensor; new QK-norm
    weights start at 1 (bias 0), the classifier is zeroed, fc_norm keeps its init."""
    want = model.state_dict()
    # pretraining-only parameters (model.objective: mask token, predictor heads) are dropped
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "objective."))}
    refuse_non_finite(source, sd)
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
    # one name per kind of new tensor: the blocks' QK-norms as blocks.*, not one per block
    groups = {re.sub(r"\.\d+\.", ".*.", k.rsplit(".", 1)[0]) + ".*" for k in missing}
    new = ", ".join(sorted(groups)) or "none"
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


def split_source(path: str) -> tuple[str, str]:
    """``PATH[:ema]@SOURCE`` -> (``PATH[:ema]``, SOURCE); no ``@NAME`` suffix -> (path, "")."""
    head, at, tail = path.rpartition("@")
    if at and head and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", tail):
        return head, tail
    return path, ""


def apply_init(model, spec: str) -> None:
    """Initialise ``model`` from ``model.init``: official:PATH | ckpt:PATH |
    pretrain:PATH[:ema][@SOURCE] (SOURCE: which source of a joint checkpoint). The kinds are
    the registered ``INIT_SOURCES`` (unipred.train.formats)."""
    kind, _, path = spec.partition(":")
    init = INIT_SOURCES.get(kind)
    if init is None:
        raise ValueError(
            f"model.init: unknown kind {kind!r} in {spec!r}; use official:PATH, "
            "ckpt:PATH or pretrain:PATH[:ema]"
        )
    init(model, path)


def _init_ckpt(model, path: str) -> None:
    load_weights(model, path)
    print(f"model.init: loaded {path}: all {len(model.state_dict())} tensors matched, 0 new")


def _init_pretrain(model, path: str) -> None:
    path, source = split_source(path)
    use_ema = path.endswith(":ema")
    path = path[: -len(":ema")] if use_ema else path
    ckpt = read_checkpoint(path)
    if use_ema and "ema_state_dict" not in ckpt:
        raise CheckpointError(f"{path}: missing key 'ema_state_dict' (asked for :ema)")
    sd = ckpt["ema_state_dict"] if use_ema else _strip(ckpt["state_dict"])
    # another layout (a joint checkpoint: that modality's tokenizer, docs/joint.md)
    adapter = next((a for a in STATE_ADAPTERS.values() if a[0](sd)), None)
    if adapter is not None:
        sd = adapter[1](model, sd, path, source)
    elif source:
        raise CheckpointError(f"{path}: @{source} names a joint source; not a joint checkpoint")
    load_backbone(model, sd, path)


INIT_SOURCES.update(ckpt=_init_ckpt, pretrain=_init_pretrain)
