"""The EMA of the weights under ``trainer.strategy=fsdp2``, sharded like the weights.

Under FSDP2 every parameter of the task model is a ``DTensor``: each rank holds one slice. The
EMA keeps one tensor per state-dict entry of the model, made with ``zeros_like`` of that entry,
so it is a ``DTensor`` with the same placement (a rank holds the EMA of exactly the slice it
holds of the weights; buffers, which FSDP2 does not shard, are kept whole). An update applies
the same function as the unsharded EMA (``torch.optim.swa_utils.get_ema_multi_avg_fn``: the
first update copies, later ones ``lerp`` by ``1 - decay``) to the local slices, with no
communication; element by element it is the unsharded EMA's arithmetic.

Checkpoints: the EMA goes into the distributed checkpoint folder next to the weights, under
``ema_state_dict.<name>`` (each rank writes its slices; ``ShardedStrategy.save_checkpoint``),
with the update count in ``meta.pt``. On resume ``ShardedStrategy.load_checkpoint`` reads it
into this callback's tensors through DCP, which reshards it to the new world size as it does
the weights. ``read_checkpoint`` of the folder returns it whole, as ``ema_state_dict``, which
is what ``unipred export --ema`` and ``model.init=pretrain:FOLDER:ema`` read.

Validation under fsdp2 reports the EMA too (``val_ema/``), as the other strategies do: the EMA
is sharded exactly like the weights, so :meth:`ShardedEMA.swapped` exchanges, on every rank, the
local slice of each weight with the local slice of its EMA (no communication), the validation step runs, and the slices are
exchanged back (bit for bit the training weights again). FSDP2 does not free the root unit's
gathered weights after a forward pass (for training they would be gathered again at once), so
every FSDP unit is resharded before and after the swap: no forward pass runs on weights
gathered before an exchange (a no-op where nothing is gathered). It costs a copy of the local
slices and three copies per validation batch, and the EMA forward's own all-gathers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from unipred.train.callbacks import EMA, EMAConfig


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local slice (the same storage: in-place updates reach the DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _reshard(model: torch.nn.Module) -> None:
    """Free every FSDP2 unit's gathered weights, so the next forward gathers the slices anew."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class ShardedEMA(EMA):
    """EMA of ``pl_module.model`` whose tensors are sharded like the model's (module
    docstring); the update schedule (``every_n_steps``, per optimizer step) is the EMA's."""

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1):
        super().__init__(decay, every_n_steps)
        self.tensors: dict[str, torch.Tensor] | None = None
        self._n = 0

    @classmethod
    def from_config(cls, c: EMAConfig) -> ShardedEMA:
        return cls(c.decay, c.every_n_steps)

    def setup(self, trainer, pl_module, stage):
        pass  # the tensors are made from the sharded model (after configure_model)

    def on_fit_start(self, trainer, pl_module):
        self.state(pl_module.model)

    @property
    def module(self):
        return None  # no separate EMA module: validation swaps the slices in (swapped)

    def _count(self) -> int:
        return self._n

    def state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The EMA tensors (made on first use, zeros shaped and sharded like ``model``'s
        state dict): what checkpoints save and what resuming loads into."""
        if self.tensors is None:
            self.tensors = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        return self.tensors

    @torch.no_grad()
    def _update(self, model) -> None:
        ema = self.state(model)
        cur = model.state_dict()
        if cur.keys() != ema.keys():
            raise RuntimeError(
                f"the EMA holds {sorted(set(ema) ^ set(cur))[:3]} the model does not"
            )
        es = [_local(ema[k]) for k in ema]
        cs = [_local(cur[k].detach()) for k in ema]
        if self._n == 0:
            for e, c in zip(es, cs):
                e.copy_(c)
        else:  # get_ema_multi_avg_fn's arithmetic, per dtype group
            floats = [(e, c) for e, c in zip(es, cs) if e.is_floating_point() or e.is_complex()]
            if floats:
                torch._foreach_lerp_([e for e, _ in floats], [c for _, c in floats], 1 - self.decay)
            for e, c in zip(es, cs):
                if not (e.is_floating_point() or e.is_complex()):
                    e.copy_(e * self.decay + c * (1 - self.decay))
        self._n += 1

    @property
    def ready(self) -> bool:
        """Whether the EMA holds an update (before the first one there is nothing to validate)."""
        return self.tensors is not None and self._n > 0

    @contextmanager
    @torch.no_grad()
    def swapped(self, model: torch.nn.Module):
        """Inside the block ``model``'s local slices are the EMA's; afterwards they are the
        training weights again, bit for bit (module docstring)."""
        ema = self.state(model)
        cur = model.state_dict()
        pairs = [(_local(cur[k]), _local(ema[k])) for k in ema]
        _reshard(model)  # drop weights gathered from the training slices
        saved = [c.clone() for c, _ in pairs]
        for c, e in pairs:
            c.copy_(e)
        try:
            yield model
        finally:
            _reshard(model)  # drop weights gathered from the EMA slices
            for (c, _), s in zip(pairs, saved):
                c.copy_(s)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.tensors is not None and self._n > 0:
            checkpoint["ema_state_dict"] = dict(self.tensors)  # sharded: written by DCP
            checkpoint["ema_n_averaged"] = torch.tensor(self._n, dtype=torch.long)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        # the tensors were read by ShardedStrategy.load_checkpoint; the count is in meta.pt
        if "ema_n_averaged" in checkpoint and checkpoint.get("ema_loaded"):
            self._n = int(checkpoint["ema_n_averaged"])
