"""Streaming webdataset shards for any modality: the shard-spec helpers and
:class:`ShardReader`, the base of every shard reader the modalities ship (images, audio, video,
segmentation). It implements the resume contract of :class:`unipred.loader.ResumableStream`.
"""

from __future__ import annotations

import glob
import json
import os
import random

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from unipred.data.accounting import COUNTER, BadSampleCounter, Once, reading
from unipred.data.seeding import seeded, stream_batch

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://")


class _Silent:
    """A counter that counts nothing (for samples decoded a second time)."""

    def count(self, *args, **kwargs):
        pass


_SILENT = _Silent()


def is_shard_spec(spec: str) -> bool:
    """True for shard patterns, tar files, remote URLs/pipes, or folders of .tar files."""
    if spec.startswith(_REMOTE_PREFIXES) or "{" in spec or spec.endswith(".tar") or "::" in spec:
        return True
    return os.path.isdir(spec) and bool(glob.glob(os.path.join(spec, "*.tar")))


def resolve_shards(spec: str) -> list[str]:
    """Expand a shard spec into the list of URLs webdataset opens (braces, ``::``, globs)."""
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif "*" in spec and not spec.startswith(_REMOTE_PREFIXES):
        urls = sorted(glob.glob(spec))
    else:
        urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise ValueError(f"no shards found for {spec!r}")
    return urls


def shard_metadata(spec: str) -> dict:
    """The packer's ``meta.json`` next to local shards (num_samples, classes), or {}."""
    if spec.startswith(_REMOTE_PREFIXES):
        return {}
    folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


class ShardReader(IterableDataset):
    """Streaming reader of webdataset shards, for any modality: subclasses implement
    ``decode(sample) -> item or None`` (None = skipped, and counted by the subclass).

    * Shards are split across ranks (``RANK``/``WORLD_SIZE`` or torch.distributed) and
      DataLoader workers; with fewer shards than readers, samples are split instead.
    * Training reshuffles each epoch: shard order from ``seed + epoch`` (identical on
      every rank, so the split stays disjoint) and a sample buffer of ``shuffle_buffer``.
      The epoch is ``set_epoch``'s value plus the passes started since, so it advances by
      itself when nobody calls ``set_epoch`` and stays exact when the engine does.
    * With ``num_samples`` known (given, or the packer's meta.json), training yields
      exactly ``num_samples // world_size`` samples per rank per epoch (re-reading its
      shards if needed), so distributed ranks never run out of step; once the loader has
      told the batch size (``resume(0, batch_size)``), each worker's share is a whole
      number of batches, so the DataLoader's round-robin over workers never breaks.
    * It implements :class:`unipred.loader.ResumableStream`: ``resume(batches, batch_size)``
      makes worker w skip the good samples of the batches it had delivered (batch i of an
      epoch comes from worker ``i % W``). The stream of each (epoch, rank, worker) is a
      function of the seed only and a skipped sample is decoded (silently) only to learn
      whether it was good (and counted, so the epoch's bad-sample report is whole), so the
      resumed epoch continues exactly where the interrupted one stopped: no sample repeated,
      none lost. Each bad sample is counted once per epoch, in the first pass over the
      shards (a quota may make a worker read its shards again).
    """

    def __init__(
        self,
        spec: str,
        transform=None,
        training: bool = True,
        shuffle_buffer: int = 5000,
        seed: int = 0,
        num_samples: int | None = None,
        counter: BadSampleCounter | None = None,
    ):
        self.spec, self.urls = spec, resolve_shards(spec)
        meta = shard_metadata(spec)
        self.num_samples = num_samples or meta.get("num_samples")
        self.classes = meta.get("classes", [])
        self.transform, self.training = transform, training
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.counter = counter or COUNTER
        # shared memory: set_epoch/resume in the main process must reach persistent workers,
        # and the per-worker pass counts must survive non-persistent workers being re-forked
        # [epoch base, epoch to skip in, batches to skip, batch size (0: not told)]
        self._state = torch.tensor([0, -1, 0, 0], dtype=torch.int64).share_memory_()
        self._passes = torch.zeros(129, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Fix the shuffling epoch of the next pass (the engine calls this at epoch start)."""
        self._state[0] = int(epoch)
        self._passes.zero_()

    def resume(self, batches: int, batch_size: int) -> None:
        """This rank's loader had consumed ``batches`` batches of ``batch_size`` in the
        current epoch (``set_epoch``'s): skip them. ``resume(0, batch_size)`` only tells the
        batch size, so that every worker delivers whole batches."""
        if batch_size < 1 or batches < 0:
            raise ValueError(f"resume: batches={batches}, batch_size={batch_size}")
        self._state[1] = int(self._state[0])
        self._state[2] = int(batches)
        self._state[3] = int(batch_size)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"{self.spec}: number of samples unknown (no meta.json)")
        return self.num_samples // pytorch_worker_info()[1]

    def _next_epoch(self, worker: int) -> int:
        slot = worker % len(self._passes)
        k = int(self._passes[slot])
        self._passes[slot] += 1
        return int(self._state[0]) + k

    def _role(self, epoch: int) -> tuple[int, int, int, int]:
        """(rank, world, role, workers): the worker whose share this worker reads.

        A resumed epoch's DataLoader takes its first batch from worker 0, but the next batch
        of the interrupted epoch (batch ``b``) was worker ``b % W``'s: worker w then reads
        worker ``(w + b) % W``'s share, so the batches come in the uninterrupted order."""
        rank, world, worker, workers = pytorch_worker_info()
        if int(self._state[1]) == epoch:
            worker = (worker + int(self._state[2])) % workers
        return rank, world, worker, workers

    def _assign(self, epoch: int):
        """-> (my shard urls, sample stride, sample offset, quota or None, samples to skip)."""
        rank, world, worker, workers = self._role(epoch)
        urls = list(self.urls)
        if self.training:
            random.Random(self.seed + epoch).shuffle(urls)
        total, me = world * workers, rank * workers + worker
        bs = max(1, int(self._state[3]))
        quota = None
        if self.training and self.num_samples:
            # whole batches per worker: the loader takes batch i from worker i % workers
            batches = self.num_samples // world // bs
            quota = (batches // workers + (worker < batches % workers)) * bs
        skip = 0
        if int(self._state[1]) == epoch:
            skip = len(range(worker, int(self._state[2]), workers)) * bs
        if len(urls) >= total:
            return urls[me::total], 1, 0, quota, skip
        return urls, total, me, quota, skip

    def _raw(self, urls, stride, offset, rng):
        src = wds.tarfile_samples(({"url": u} for u in urls), handler=self.counter.handler)
        if stride > 1:
            src = (s for i, s in enumerate(src) if i % stride == offset)
        if self.training and self.shuffle_buffer > 1:
            src = wds.filters._shuffle(
                src, self.shuffle_buffer, min(1000, self.shuffle_buffer), rng
            )
        return src

    def decode(self, sample: dict):
        """A raw webdataset sample dict -> an item, or None when skipped (count it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement decode(sample)")

    def _decode_once(self, raw: dict, count: bool):
        """``decode(raw)`` counting at most one reason for the sample (``count=False``:
        nothing, for a sample met again in a later pass of the same epoch)."""
        counter = self.counter
        self.counter = Once(counter) if count else _SILENT
        try:
            with reading(self.counter):
                return self.decode(raw)
        finally:
            self.counter = counter

    def __iter__(self):
        info = pytorch_worker_info()
        epoch = self._next_epoch(info[2])
        urls, stride, offset, quota, skip = self._assign(epoch)
        if quota is not None and skip >= quota:
            return  # this worker had delivered all of its share before the restart
        # ints only (stable across runs); the role, not the worker id, on a resumed epoch
        rng = random.Random(hash((self.seed, epoch, self._role(epoch))))
        role, bs = self._role(epoch)[::2], max(1, int(self._state[3]))  # (rank, role)
        produced, passes = 0, 0
        while quota is None or produced < quota:
            got = 0
            for raw in self._raw(urls, stride, offset, rng):
                got += 1
                # each sample counts once per epoch: in the first pass over the shards. Its
                # random choices are a function of (seed, epoch, sample key, pass), not of
                # this worker's stream (unipred.data.seeding)
                with seeded(self.seed, epoch, str(raw.get("__key__", "")), passes):
                    out = self._decode_once(raw, count=passes == 0)
                if out is None:
                    continue
                if produced < skip:  # resumed: delivered before the restart. Decoded and
                    produced += 1  # counted again, so the epoch's report is whole
                    continue
                if produced % bs == 0:  # the first sample of a batch: seeds its collate
                    stream_batch(self.seed, epoch, *role, produced // bs)
                yield out
                produced += 1
                if quota is not None and produced >= quota:
                    return
            passes += 1
            if quota is None or got == 0 or passes > 1000:
                return  # one pass (evaluation), or nothing readable at all
