"""Data loaders whose position inside an epoch survives a restart.

Map-style data: ``EpochSampler`` shards one seeded permutation per epoch over the ranks (the
same permutation for any world size, so 1 x 8 and 2 x 4 see the same global batches) and can
skip the samples a resumed run has already consumed.

Streaming data (``IterableDataset``): the engine calls ``dataset.set_epoch(epoch)`` at every
epoch start when the dataset has it, and on resume ``dataset.resume(batches, batch_size)`` with
the number of batches this rank had consumed in the epoch. A streaming dataset that wants exact
resumption implements both: shard order a function of (seed, epoch) only, and ``resume``
making each DataLoader worker w (of W; the loader takes batches from the workers round-robin)
skip the ``len(range(w, batches, W))`` batches it had already delivered, i.e. whole shards
first, then samples. Then a resumed run neither repeats nor skips a shard within the epoch
(tests/test_resume.py has a reference implementation). Without ``resume`` the loader warns and
the epoch's stream restarts. Workers of streaming loaders are not persistent, so the epoch and
resume position reach them at every epoch start.

``ResumableLoader`` implements Lightning's ``state_dict``/``load_state_dict`` loader protocol,
so its position is stored in every checkpoint.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler


class EpochSampler(Sampler[int]):
    """Seeded per-epoch permutation, rank r takes positions r, r + W, r + 2W, ...

    Each rank yields ``samples_per_rank`` indices (a multiple of the per-device batch times
    the accumulation, so every epoch has a whole number of optimizer steps)."""

    def __init__(
        self, n: int, world: int, rank: int, samples_per_rank: int, seed: int, shuffle: bool = True
    ):
        self.n, self.world, self.rank = n, world, rank
        self.samples_per_rank, self.seed, self.shuffle = samples_per_rank, seed, shuffle
        self.epoch, self._skip = 0, (None, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, epoch: int, n_samples: int) -> None:
        """Drop the first ``n_samples`` of ``epoch`` (those a resumed run already consumed)."""
        self._skip = (epoch, n_samples)

    def __len__(self) -> int:
        return self.samples_per_rank

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        idx = perm[self.rank :: self.world][: self.samples_per_rank].tolist()
        epoch, n = self._skip
        if epoch == self.epoch:  # kept (not cleared): Lightning may call iter() more than once
            idx = idx[n:]
        return iter(idx)


class ResumableLoader(DataLoader):
    """A DataLoader that records how many batches of the current epoch were consumed.

    The engine calls ``mark_consumed()`` once per training batch (before it runs), and
    Lightning stores ``state_dict()`` in each checkpoint."""

    def __init__(self, *args, world: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.consumed, self.epoch, self.world = 0, 0, world

    def mark_consumed(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0
        self.consumed += 1

    def state_dict(self) -> dict:
        bs = int(self.batch_size or 1)
        return {
            "epoch": self.epoch,
            "consumed_batches": self.consumed,
            "batch_size": bs,
            "world_size": self.world,
            "samples_global": self.consumed * bs * self.world,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed_batches"])
        if isinstance(self.sampler, EpochSampler):
            # the first k global batches are perm[:k * global_batch] for any world size, so a
            # run may resume on a different number of devices with the same global batch
            total = int(state.get("samples_global", self.consumed * (self.batch_size or 1)))
            if total % self.world:
                raise ValueError(
                    f"cannot resume: {total} consumed samples do not split over {self.world} ranks"
                )
            self.sampler.skip(self.epoch, total // self.world)
            self.consumed = total // self.world // int(self.batch_size or 1)
        elif isinstance(self.dataset, IterableDataset):
            if state.get("world_size", self.world) != self.world:
                warnings.warn(
                    "streaming data resumed on a different world size: the stream "
                    "position is approximate",
                    stacklevel=2,
                )
            if hasattr(self.dataset, "resume"):
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch)
                self.dataset.resume(self.consumed, int(self.batch_size or 1))
            elif self.consumed:
                warnings.warn(
                    f"{type(self.dataset).__name__} has no resume(); the resumed epoch restarts "
                    "its stream (some samples repeat)",
                    stacklevel=2,
                )


def build_loader(
    dataset,
    batch_size: int,
    world: int,
    rank: int,
    accumulate: int,
    seed: int,
    train: bool,
    num_workers: int,
    collate_fn=None,
    pin_memory: bool = False,
):
    """A ResumableLoader (train) or a plain sharded DataLoader (val)."""
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )  # keeps the global RNG untouched
    if isinstance(dataset, IterableDataset):
        common["persistent_workers"] = False  # workers must see set_epoch / resume
        return ResumableLoader(dataset, drop_last=train, world=world, **common)
    n = len(dataset)
    per_rank = n // world
    if train:
        chunk = batch_size * accumulate
        per_rank = per_rank // chunk * chunk
        if per_rank == 0:
            raise ValueError(
                f"the training set has {n} samples, fewer than one global batch "
                f"({batch_size} x {accumulate} accumulation x {world} devices)"
            )
    else:
        per_rank = -(-n // world)  # validation sees every sample (the last rank may repeat a few)
    sampler = EpochSampler(n, world, rank, per_rank, seed, shuffle=train)
    if not train:
        sampler = _PaddedSampler(n, world, rank, per_rank)
    if train:
        return ResumableLoader(dataset, sampler=sampler, drop_last=True, world=world, **common)
    return DataLoader(dataset, sampler=sampler, drop_last=False, **common)


class _PaddedSampler(Sampler[int]):
    def __init__(self, n, world, rank, per_rank):
        self.idx = [(rank + world * i) % n for i in range(per_rank)]

    def __len__(self):
        return len(self.idx)

    def __iter__(self):
        return iter(self.idx)
