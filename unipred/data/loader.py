"""Data loaders whose position inside an epoch survives a restart.

Map-style data: ``EpochSampler`` shards one seeded permutation per epoch over the ranks (the
same permutation for any world size, so 1 x 8 and 2 x 4 see the same global batches) and can
skip the samples a resumed run has already consumed.

Streaming data (``IterableDataset``): exact resumption is the :class:`ResumableStream`
contract below, which every streaming reader the project ships implements
(``unipred.data.shards.ShardReader``: the image, audio, video and segmentation shard readers). A
stream without it still trains, but a resumed epoch restarts its stream (the loader warns).
Workers of streaming loaders are not persistent, so the epoch and resume position reach them
at every epoch start.

``ResumableLoader`` implements Lightning's ``state_dict``/``load_state_dict`` loader protocol,
so its position is stored in every checkpoint.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from unipred.base.warn import warn
from unipred.data import uneven
from unipred.data.uneven import Steps


@runtime_checkable
class ResumableStream(Protocol):
    """What a streaming (``IterableDataset``) training set implements to resume exactly.

    * ``set_epoch(epoch)``: the engine calls it at every epoch start, before the DataLoader
      starts its workers. What each (epoch, rank, worker) yields must be a function of the
      seed and ``epoch`` only (shard order, shuffle buffer, skipped bad samples).
    * ``resume(batches, batch_size)``: the loader calls it with ``batches=0`` when it is
      built (telling the batch size) and, on a restart, after ``set_epoch(epoch)`` with the
      number of batches this rank had consumed in that epoch. The DataLoader takes batch i
      from worker ``i % W``, so every worker w must deliver whole batches and, on resume,
      skip the ``len(range(w, batches, W))`` batches it had delivered, counting only the
      samples it had actually yielded (bad ones it dropped do not count). The skip applies
      to that epoch only.

    Then a resumed run neither repeats nor skips a sample within the epoch.
    """

    def set_epoch(self, epoch: int) -> None: ...

    def resume(self, batches: int, batch_size: int) -> None: ...


class EpochSampler(Sampler[int]):
    """Seeded per-epoch permutation, rank r takes positions r, r + W, r + 2W, ...

    Each rank yields ``samples_per_rank`` indices (a multiple of the per-device batch times
    the accumulation, so every epoch has a whole number of optimizer steps)."""

    def __init__(
        self,
        n: int,
        world: int,
        rank: int,
        samples_per_rank: int,
        seed: int,
        shuffle: bool = True,
        keyed: bool = False,
    ):
        self.n, self.world, self.rank = n, world, rank
        self.samples_per_rank, self.seed, self.shuffle = samples_per_rank, seed, shuffle
        # keyed: yield (epoch, index), the key SeededDataset reads a sample with. The epoch
        # travels with each index because persistent workers never see set_epoch
        self.keyed = keyed
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
        if self.keyed:
            return iter([(self.epoch, i) for i in idx])
        return iter(idx)


class ResumableLoader(DataLoader):
    """A DataLoader that records how many batches of the current epoch were consumed.

    The engine calls ``mark_consumed()`` once per training batch (before it runs), and
    Lightning stores ``state_dict()`` in each checkpoint."""

    def __init__(self, *args, world: int = 1, rank: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.consumed, self.epoch, self.world, self.rank = 0, 0, world, rank
        # streams resumed elastically: global samples before the resumed part of the epoch,
        # and batches this rank took since then
        self.samples_before, self.since_plan = 0, 0
        self.steps = Steps()  # (padding, loss weight) of each delivered batch (uneven.py)

    def __iter__(self):
        it = super().__iter__()
        # a training stream on several ranks: the ranks may deliver different numbers of
        # batches (a shard gone on one of them); they stay in step without repeating a sample
        if isinstance(self.dataset, IterableDataset) and uneven.active():
            self.steps.clear()
            return uneven.joined(it, self.steps, int(self.batch_size or 1))
        return it

    def __len__(self) -> int:
        # A training stream of known size plans whole batches per rank (its quota), even
        # without drop_last (kept off so a reader that falls short still ends in a partial
        # batch): the length must say so, or Lightning waits for a last batch that never
        # comes and skips the epoch's validation.
        ds = self.dataset
        if isinstance(ds, IterableDataset) and getattr(ds, "training", False) and self.batch_size:
            try:
                return len(ds) // int(self.batch_size)
            except TypeError:  # size unknown
                pass
        return super().__len__()

    def mark_consumed(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed, self.since_plan, self.samples_before = epoch, 0, 0, 0
        self.consumed += 1
        self.since_plan += 1

    def _elastic(self) -> bool:
        return isinstance(self.dataset, IterableDataset) and hasattr(self.dataset, "stream_state")

    def state_dict(self) -> dict:
        bs = int(self.batch_size or 1)
        state = {
            "epoch": self.epoch,
            "consumed_batches": self.consumed,
            "batch_size": bs,
            "world_size": self.world,
            "samples_global": self.samples_before + self.since_plan * bs * self.world,
        }
        if self._elastic():  # every rank gets here together (Lightning saves on all ranks)
            state["stream"] = self.dataset.stream_state(
                self.epoch, self.since_plan, self.world, self.rank, self.num_workers
            )
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed_batches"])
        bs = int(self.batch_size or 1)
        if isinstance(self.sampler, EpochSampler):
            # the first k global batches are perm[:k * global_batch] for any world size, so a
            # run may resume on a different number of devices with the same global batch
            total = int(state.get("samples_global", self.consumed * (self.batch_size or 1)))
            if total % self.world:
                raise ValueError(
                    f"cannot resume: {total} consumed samples do not split over {self.world} ranks"
                )
            epoch, skip = self.epoch, total // self.world
            if skip >= len(self.sampler):
                # saved at the end of the epoch: the resumed run starts the next one
                epoch, skip = epoch + 1, 0
            self.sampler.skip(epoch, skip)
            # Lightning makes the resumed epoch's iterator before it calls set_epoch, and a
            # worker loader draws its first indices right then: the sampler must already
            # be at the saved epoch (with 0 workers the draw came later, which hid this)
            self.sampler.set_epoch(epoch)
            self.epoch, self.consumed = epoch, skip // int(self.batch_size or 1)
            self.since_plan = self.consumed
        elif self._elastic() and state.get("stream") is not None:
            # what the epoch had left, split again over this world size and worker count
            self.samples_before = int(state.get("samples_global", 0))
            self.epoch = self.dataset.load_stream_state(
                state["stream"], self.world, bs, self.num_workers
            )
            if self.epoch != int(state["epoch"]):
                self.samples_before = 0
            self.consumed = self.samples_before // (bs * self.world)
            self.since_plan = 0
        elif isinstance(self.dataset, IterableDataset):
            if state.get("world_size", self.world) != self.world:
                warn(
                    "streaming data resumed on a different world size: the stream "
                    "position is approximate"
                )
            if isinstance(self.dataset, ResumableStream):
                epoch, consumed = self.epoch, self.consumed
                try:
                    per_epoch = len(self)
                except TypeError:  # a stream of unknown length
                    per_epoch = 0
                if per_epoch and consumed >= per_epoch:
                    # saved at the end of the epoch: Lightning's first iterator (made before
                    # on_train_epoch_start) already belongs to the next one
                    epoch, consumed = epoch + 1, 0
                self.dataset.set_epoch(epoch)
                self.dataset.resume(consumed, int(self.batch_size or 1))
                self.since_plan = self.consumed
            elif self.consumed:
                warn(
                    f"{type(self.dataset).__name__} is no ResumableStream; the resumed epoch restarts "
                    "its stream (some samples repeat)"
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
    """A ResumableLoader (train) or a plain sharded DataLoader (val).

    Training data is read with per-sample randomness (``unipred.data.seeding``): a map-style
    set through :class:`SeededDataset` (random choices seeded by (seed, epoch, index)), and
    the collate inside the seed of its batch; streams seed their samples themselves."""
    from unipred.data.seeding import SeededCollate, SeededDataset

    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=SeededCollate(collate_fn) if train else collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )
    if isinstance(dataset, IterableDataset):
        common["persistent_workers"] = False  # workers must see set_epoch / resume
        if train and isinstance(dataset, ResumableStream):
            dataset.resume(0, batch_size)  # whole batches per worker from the first epoch
        # a reader that falls short (a shard gone) ends with a partial batch rather than
        # dropping samples; on several ranks the loader keeps the ranks in step (uneven.py)
        return ResumableLoader(dataset, drop_last=False, world=world, rank=rank, **common)
    n = len(dataset)
    per_rank = n // world
    if train:
        chunk = batch_size * accumulate
        per_rank = per_rank // chunk * chunk
        if per_rank == 0:
            raise ValueError(
                f"the training set has {n} samples, fewer than one global batch "
                f"({batch_size} x {accumulate} accumulation x {world} devices); set "
                f"trainer.global_batch to at most {n}"
            )
    else:
        per_rank = -(-n // world)  # validation sees every sample (the last rank may repeat a few)
    if train:
        sampler = EpochSampler(n, world, rank, per_rank, seed, shuffle=True, keyed=True)
        seeded = SeededDataset(dataset, seed)
        return ResumableLoader(
            seeded, sampler=sampler, drop_last=True, world=world, rank=rank, **common
        )
    sampler = _PaddedSampler(n, world, rank, per_rank)
    return DataLoader(dataset, sampler=sampler, drop_last=False, **common)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers survive a scheduler's SIGTERM and SIGUSR1 (``worker_init_fn``).

    A scheduler (SLURM, Kubernetes, ``timeout``, ``kill -TERM -PGID``) signals every process
    of the job, the workers too. torch's worker handler dies of a SIGTERM that its parent did
    not send, and the main process then fails its batch with "worker killed by signal"
    before it can write ``last.ckpt``. Here a worker takes SIGTERM from a thread that sees
    the sender: from its parent (the DataLoader shutting it down) it exits at once, as torch's
    handler does; from anyone else it is ignored, and the main process finishes its batch,
    saves and shuts the workers down itself. SIGUSR1 (SLURM's warning) would kill a worker by
    default: ignored. SIGINT keeps torch's handling."""
    import signal
    import threading

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # no sender to tell apart (macOS): torch's handler
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, name="unipred-sigterm", daemon=True).start()


class _PaddedSampler(Sampler[int]):
    def __init__(self, n, world, rank, per_rank):
        self.idx = [(rank + world * i) % n for i in range(per_rank)]

    def __len__(self):
        return len(self.idx)

    def __iter__(self):
        return iter(self.idx)
