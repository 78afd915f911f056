"""FSDP2 with sharded, reshardable checkpoints: ``trainer.strategy=fsdp2``.

Parameters, gradients and optimizer state are sharded with torch's ``fully_shard`` (FSDP2,
one unit per predictor block plus the root), run through Lightning's ``ModelParallelStrategy``
(data parallel over every rank, no tensor parallelism). It runs on CPU processes (gloo; tested
in tests/test_fsdp_sharded.py) as on GPUs (NCCL; not run by the tests), unlike Lightning's
``FSDPStrategy``, which refuses ``accelerator=cpu``.

A checkpoint is a *folder* written by torch's distributed checkpoint (DCP): each rank writes
its own shards (``__R_0.distcp``), DCP's index (``.metadata``) says which slice of which tensor
each file holds, and Lightning's ``meta.pt`` holds everything else (step, loops, scheduler,
loader position, config). DCP reads a tensor's slices from whatever files hold them, so a
checkpoint written on W ranks loads on any W' (resharded on load, as torchtitan does).

What unipred adds (the rules every checkpoint follows, docs/faults.md):

* **atomic**: the folder is written under ``.NAME.tmp-PID`` and renamed into place once every
  rank has written its shards; a run killed mid-write leaves the previous ``NAME`` (a crash in
  the instant between the two renames leaves it as ``.NAME.old-PID``, next to the step
  checkpoint of the same step). Dead temporaries are removed by the next save.
* **loaded without running code**: ``meta.pt`` through ``torch.load(weights_only=True)``; DCP
  reads its ``.metadata`` with a plain ``pickle.load``, so that file's pickle is checked first:
  it may name DCP's own metadata classes and a few torch types, nothing else; and DCP
  unpickles the non-tensor entries of the shard files with ``weights_only=False``, so every
  load here (resume, ``read_checkpoint``: export, ``model.init=pretrain:``) goes through
  :func:`safe_planner`, which unpickles each with ``weights_only=True`` first.
* **the EMA** (unipred.train.sharded_ema) is sharded like the weights and written in the same
  folder (``ema_state_dict.*``), resharded on load like them.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from unipred.train.checkpoint import CheckpointError, UnsafeCheckpointError, safe_load

META = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint
EMA_KEY = "ema_state_dict"  # the sharded EMA's entries in DCP (unipred.train.sharded_ema)
DCP_INDEX = ".metadata"

# What DCP's index pickle may name: its own plain metadata classes, torch sizes, dtypes and
# layouts, and the path it was written to. Anything else could run code when unpickled.
_DCP = "torch.distributed.checkpoint."
DCP_GLOBALS = {
    _DCP + "metadata.Metadata", _DCP + "metadata.MetadataIndex", _DCP + "metadata.StorageMeta",
    _DCP + "metadata.TensorProperties", _DCP + "metadata.TensorStorageMetadata",
    _DCP + "metadata.ChunkStorageMetadata", _DCP + "metadata.BytesStorageMetadata",
    _DCP + "metadata._MEM_FORMAT_ENCODING", _DCP + "filesystem._StorageInfo",
    "torch.Size", "torch.serialization._get_layout", "pathlib.PosixPath", "pathlib.Path",
    "collections.OrderedDict",
}  # fmt: skip


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a distributed-checkpoint folder (Lightning's ``meta.pt`` inside)."""
    p = Path(path)
    return p.is_dir() and (p / META).is_file()


def check_index(path: Path) -> None:
    """Refuse a DCP folder whose ``.metadata`` pickle names an object outside
    :data:`DCP_GLOBALS` (one line naming the file), before DCP unpickles it."""
    from unipred.train.pickle_scan import _storage_like, globals_in_pickle

    index = path / DCP_INDEX
    if not index.is_file():
        raise CheckpointError(f"{path}: missing {DCP_INDEX} (not a complete sharded checkpoint)")
    with open(index, "rb") as f:
        names, ok = globals_in_pickle(f)
    bad = [n for n in dict.fromkeys(names) if n not in DCP_GLOBALS and not _storage_like(n)]
    if bad:
        raise UnsafeCheckpointError(
            f"{index}: refused: holds Python objects that could run code; unipred loads "
            f"tensors only (its pickle asks for {', '.join(bad[:3])}; nothing in it was run)"
        )
    if not ok:
        raise CheckpointError(f"{index}: damaged (its pickle does not parse); nothing was run")


def _index(path: Path):
    import torch.distributed.checkpoint as dcp

    check_index(path)
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged index
        raise CheckpointError(f"{path / DCP_INDEX}: damaged ({type(e).__name__})") from None


def safe_planner(path: Path, refused: list):
    """DCP's default load planner, except that a non-tensor entry of a shard file (DCP pickles
    them: learning rates, betas, parameter names) is first unpickled with
    ``torch.load(weights_only=True)``: one that names anything beyond plain values and tensors
    is refused (an :class:`UnsafeCheckpointError` appended to ``refused``, then raised) before
    it runs. DCP's own ``load_bytes`` unpickles them with ``weights_only=False``."""
    import io

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except Exception as e:  # noqa: BLE001 - refused by the safe unpickler, or damaged
                fqn = read_item.dest_index.fqn
                if isinstance(e, pickle.UnpicklingError):  # torch's weights-only refusal
                    refused.append(UnsafeCheckpointError(
                        f"{path}: refused: the entry {fqn!r} of a shard file holds Python "
                        "objects that could run code; nothing in it was run"))  # fmt: skip
                else:
                    refused.append(CheckpointError(
                        f"{path}: the entry {fqn!r} of a shard file is damaged "
                        f"({type(e).__name__}); nothing in it was run"))  # fmt: skip
                raise refused[-1] from None
            value.seek(0)  # only plain values and tensors: DCP's own unpickling is safe now
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()


def dcp_load(state: dict, path: Path, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load`` of ``state`` (in place) from the folder ``path``
    through :func:`safe_planner`; a refused entry raises its one-line error."""
    import torch.distributed.checkpoint as dcp

    refused: list = []
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path), planner=safe_planner(path, refused),
                     no_dist=no_dist)  # fmt: skip
    except BaseException:  # DCP's CheckpointException is a BaseException
        if refused:
            raise refused[0] from None
        raise


def read_sharded(path: str | os.PathLike, tensors: bool = True) -> dict:
    """A sharded checkpoint as one dict on this process: ``meta.pt``'s keys, ``state_dict``
    (full, unsharded tensors; with ``tensors=False`` empty tensors on the meta device, shapes
    only, nothing read), ``ema_state_dict`` when the run kept an EMA (the same) and
    ``optimizer_states`` (``[{"state": {FQN: {name: tensor}},
    "param_groups": [...]}]``, keyed by parameter name; only with ``tensors``)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    meta = safe_load(path / META)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META}: not a checkpoint dict (got {type(meta).__name__})")
    index = _index(path)
    flat: dict = {}
    for key, md in index.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            dev = None if tensors else "meta"
            flat[key] = torch.empty(md.size, dtype=md.properties.dtype, device=dev)
        elif tensors:
            flat[key] = None
    if tensors:
        try:
            dcp_load(flat, path, no_dist=True)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a missing or damaged shard
            raise CheckpointError(
                f"{path}: a shard could not be read ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]})"
            ) from None
    out = dict(meta)
    out["state_dict"] = {k[len("state_dict.") :]: v for k, v in flat.items()
                         if k.startswith("state_dict.")}  # fmt: skip
    ema = {k[len(EMA_KEY) + 1 :]: v for k, v in flat.items() if k.startswith(EMA_KEY + ".")}
    if ema:
        out[EMA_KEY] = ema
    if not any(k.startswith("optimizer_0.") for k in index.state_dict_metadata):
        return out  # read_checkpoint names the missing optimizer state
    opt: dict = {"state": {}, "param_groups": {}}
    for k, v in flat.items():
        if k.startswith("optimizer_0.state."):
            fqn, _, name = k[len("optimizer_0.state.") :].rpartition(".")
            opt["state"].setdefault(fqn, {})[name] = v
        elif k.startswith("optimizer_0.param_groups."):
            i, _, name = k[len("optimizer_0.param_groups.") :].partition(".")
            opt["param_groups"].setdefault(int(i), {})[name] = v
    opt["param_groups"] = [opt["param_groups"][i] for i in sorted(opt["param_groups"])]
    out["optimizer_states"] = [opt]
    return out


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or sharded-checkpoint folder (a missing one is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as FSDP2 over every rank, with atomic sharded
    checkpoints that load without running code (module docstring)."""

    def __init__(self, world_size: int):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=True)  # fmt: skip

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tag = self.broadcast(os.getpid())  # rank 0's pid names this write's temporaries
        tmp = path.with_name(f".{path.name}.tmp-{tag}")
        old = path.with_name(f".{path.name}.old-{tag}")
        if self.is_global_zero:
            # a run folder has one training process group at a time (RunLock): every other
            # temporary was left by a write that died
            for p in path.parent.glob(f".{path.name}.*-*"):
                if p.name.rsplit("-", 1)[-1] != str(tag):
                    remove_checkpoint(p)
            remove_checkpoint(tmp)
        self.barrier()
        self._write(checkpoint, tmp)
        self.barrier()  # every rank's shards are written (DCP fsyncs each file)
        if self.is_global_zero:
            if path.exists():
                os.replace(path, old) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
            try:
                fd = os.open(path.parent, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass
            remove_checkpoint(old)
        self.barrier()

    def _write(self, checkpoint: dict, path: Path) -> None:
        """Lightning's distributed save (the weights and optimizer states through DCP, the rest
        in ``meta.pt`` from rank 0) with the sharded EMA, when there is one, in DCP as well."""
        import torch.distributed.checkpoint as dcp

        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        for i, opt in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = opt
        ema = checkpoint.pop("ema_state_dict", None)
        if ema is not None:
            state[EMA_KEY] = ema
        dcp.save(state, checkpoint_id=path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / META)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            check_index(path)
            safe_load(path / META)  # refuses a code-carrying meta.pt in unipred's words
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=True)
        return self._load_sharded(path)

    def _load_sharded(self, path: Path) -> dict:
        """Lightning's sharded load (the model's, then each optimizer's state through DCP,
        resharded to this world size; the rest from ``meta.pt``), through the safe planner,
        plus the sharded EMA. Returns ``meta.pt``'s dict."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module = self.model
        strict = self.lightning_module.strict_loading
        state = {"state_dict": get_model_state_dict(module)}
        dcp_load(state, path)
        module.load_state_dict(state["state_dict"], strict=strict)
        for i, opt in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            state = {key: get_optimizer_state_dict(module, opt)}
            dcp_load(state, path)
            set_optimizer_state_dict(module, opt, optim_state_dict=state[key],
                                     options=StateDictOptions(cpu_offload=True))  # fmt: skip
        meta = safe_load(path / META)
        self._load_ema(path, meta)
        return meta

    def _load_ema(self, path: Path, meta: dict) -> None:
        """Read the folder's EMA into the sharded EMA callback's tensors (DCP reshards it to
        this world size); ``meta["ema_loaded"]`` says it was."""
        import torch.distributed.checkpoint as dcp

        from unipred.train.sharded_ema import ShardedEMA

        lit = self.lightning_module
        ema = next((c for c in lit.trainer.callbacks if isinstance(c, ShardedEMA)), None)
        index = dcp.FileSystemReader(str(path)).read_metadata()
        if ema is None or not any(k.startswith(EMA_KEY + ".") for k in index.state_dict_metadata):
            return  # no EMA asked for, or none saved: it starts from the next update
        dcp_load({EMA_KEY: ema.state(lit.model)}, path)
        meta["ema_loaded"] = True


def shard_model(model: torch.nn.Module, mesh) -> None:
    """``fully_shard`` every predictor block of ``model``, then ``model`` itself (the
    remaining parameters: tokenizer, norms, heads), over the data-parallel ``mesh``."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from unipred.nn.predictor import Block

    if isinstance(model, FSDPModule):
        return  # configure_model runs again for a later fit/validate in the same process
    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
