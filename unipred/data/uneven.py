"""Ranks that deliver different numbers of training batches stay in step without repeating
a sample.

A streaming reader learns that a shard is gone (404, truncated, a store away for longer than
its deadline) only when it reaches it, inside a DataLoader worker, so the rank that read it
ends its epoch with fewer samples than the others. Data-parallel training needs every rank
to run the same number of steps (each step's gradients are all-reduced), and a rank whose
loader stops early would leave the others waiting forever.

:func:`joined` wraps a rank's batch iterator. Before each batch it delivers, the ranks
all-reduce one pair of integers: the samples this rank's next batch holds (0: this rank has
run out) and whether it needs a batch to stand in for one it does not have. Then

* every rank has run out: the epoch ends on every rank at the same batch;
* some ranks still have batches: a rank that has run out delivers a *padding* batch, a copy
  of the last batch it trained on, with loss weight 0 (its gradients are zeros, its
  samples are not trained and not counted as seen);
* the ranks' batches hold different numbers of samples (one ends in a partial batch, or pads):
  each rank's loss is weighted by ``world * n_rank / n_all``, so the all-reduced mean of the
  gradients is the gradient of the mean loss over the samples actually delivered. With full
  batches everywhere the weight is exactly 1.

What it costs: one all-reduce of two integers per training batch, on the host (a gloo group;
under NCCL a group of its own, so the host never waits for the GPU for it), and the compute
of the padding batches (a forward and backward pass on each rank that ran out, until the
last rank is done). A rank that has had no batch at all this
epoch (every shard it was dealt is gone) borrows one: the ranks all-gather their current
batch once (pickled), and it pads with the first one there is.

Each delivered batch's ``(padding, weight)`` is queued on the loader (:class:`Steps`); the
engine takes it when the batch starts (``unipred.train.engine``), in the order the batches
were delivered.
"""

from __future__ import annotations

from collections import deque

import torch


class Steps:
    """``(padding, loss weight)`` of the batches delivered and not yet trained, in order."""

    def __init__(self):
        self.queue: deque = deque()

    def put(self, padding: bool, weight: float) -> None:
        self.queue.append((padding, weight))

    def take(self) -> tuple[bool, float]:
        """The next trained batch's ``(padding, weight)``; ``(False, 1.0)`` when none was
        queued (one rank, or a loader that is not joined)."""
        return self.queue.popleft() if self.queue else (False, 1.0)

    def clear(self) -> None:
        self.queue.clear()


def batch_len(batch, default: int) -> int:
    """Samples in a collated batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else default
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for b in batch:
            n = batch_len(b, -1)
            if n >= 0:
                return n
    return default


def active() -> bool:
    """Whether there are several ranks to keep in step (torch.distributed initialized)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_GROUP: dict = {}  # default group -> the host-side (gloo) group made for it


def _group():
    """The process group the counts travel in: a gloo group over every rank, so that they
    stay on the host (under NCCL a device all-reduce would make the host wait for the GPU
    at every batch). Made once, by every rank together (the loaders start together)."""
    dist = torch.distributed
    if dist.get_backend() == "gloo":
        return None  # the default group
    world = dist.group.WORLD  # a process that starts a new job gets a new group
    if _GROUP.get("world") is not world:
        _GROUP.update(world=world, gloo=dist.new_group(backend="gloo"))
    return _GROUP["gloo"]


def joined(batches, steps: Steps, default_size: int):
    """Yield ``batches`` (this rank's) kept in step with every other rank's (module
    docstring); ``steps`` receives each delivered batch's ``(padding, weight)``."""
    dist = torch.distributed
    world, group = dist.get_world_size(), _group()
    it, last, mine = iter(batches), None, True
    while True:
        batch = None
        if mine:
            try:
                batch = next(it)
            except StopIteration:
                mine = False
        n = batch_len(batch, default_size) if batch is not None else 0
        need = int(batch is None and last is None)
        counts = torch.tensor([n, need], dtype=torch.int64)
        dist.all_reduce(counts, group=group)
        total, needed = (int(v) for v in counts.tolist())
        if total == 0:
            return
        if needed:  # a rank has nothing to pad with yet: every rank shows its batch
            shown = [None] * world
            dist.all_gather_object(shown, batch if batch is not None else last, group=group)
            if last is None:
                last = next(b for b in shown if b is not None)
        if batch is None:
            steps.put(True, 0.0)
            yield last
            continue
        last = batch
        steps.put(False, world * n / total)
        yield batch
