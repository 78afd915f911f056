"""Streaming webdataset shards for any modality: the shard-spec helpers and
:class:`ShardReader`, the base of every shard reader the modalities ship (images, audio, video,
segmentation). It implements the resume contract of :class:`unipred.loader.ResumableStream`
and, with shard sizes known, the elastic one of :mod:`unipred.data.elastic` (a run resumes
mid-epoch on another number of ranks or workers). Shards may be local files, ``http(s)://``
URLs or fsspec URLs (``s3://``, ``gs://``, ``hf://``): :mod:`unipred.data.remote` retries
what fails for a while and reports what is gone for good.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import tarfile
import zlib

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import base_plus_ext
from webdataset.utils import pytorch_worker_info

from unipred.data import elastic
from unipred.data.accounting import _MAX_REASONS as _REASONS
from unipred.data.accounting import COUNTER, BadSampleCounter, Once, reading
from unipred.data.remote import NetworkPolicy, ShardGone, is_remote, open_shard, read_small
from unipred.data.seeding import seeded, stream_batch

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://")
_RING = 32  # batch-end positions kept per worker: more than a worker can run ahead (prefetch)
_SLOTS = 129  # the main process + up to 128 DataLoader workers


class _Silent:
    """A counter that counts nothing (for samples decoded a second time)."""

    def count(self, *args, **kwargs):
        pass


_SILENT = _Silent()


def _remote(spec: str) -> bool:
    return spec.startswith(_REMOTE_PREFIXES) or is_remote(spec)


def is_shard_spec(spec: str) -> bool:
    """True for shard patterns, tar files, remote URLs/pipes, or folders of .tar files."""
    if _remote(spec) or "{" in spec or spec.endswith(".tar") or "::" in spec:
        return True
    return os.path.isdir(spec) and bool(glob.glob(os.path.join(spec, "*.tar")))


def resolve_shards(spec: str) -> list[str]:
    """Expand a shard spec into the list of URLs webdataset opens (braces, ``::``, globs)."""
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif "*" in spec and not _remote(spec):
        urls = sorted(glob.glob(spec))
    else:
        urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise ValueError(f"no shards found for {spec!r}")
    return urls


def shard_metadata(spec: str) -> dict:
    """The packer's ``meta.json`` next to the shards (num_samples, classes, shard_samples),
    or {}; fetched over the network for http and fsspec URLs."""
    if spec.startswith("pipe:"):
        return {}
    if is_remote(spec):
        base = spec.split("{")[0].rsplit("/", 1)[0]
        raw = read_small(f"{base}/meta.json")
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}
    folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def count_samples(path: str) -> int:
    """Samples (distinct keys) in a local tar shard; reads only the member headers."""
    keys, last = 0, None
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            key, _ = base_plus_ext(info.name)
            if info.isreg() and key is not None and key != last:
                keys, last = keys + 1, key
    return keys


def folder_shard_samples(folder) -> dict[str, int]:
    """``{file name: samples}`` of the .tar shards in ``folder``: the ``shard_samples`` entry a
    packer writes into meta.json, so that readers of remote copies know the sizes too."""
    paths = sorted(glob.glob(os.path.join(str(folder), "*.tar")))
    return {os.path.basename(p): count_samples(p) for p in paths}


def shard_sizes(urls: list[str], meta: dict) -> dict[str, int]:
    """url -> samples, from meta.json's ``shard_samples`` (by file name) or, for local shards
    it does not list, counted from the tar headers. Remote shards it does not list are left
    out (their size is unknown)."""
    listed = meta.get("shard_samples") or {}
    out = {}
    for u in urls:
        name = u.rsplit("/", 1)[-1]
        if name in listed:
            out[u] = int(listed[name])
        elif not _remote(u) and os.path.isfile(u):
            try:
                out[u] = count_samples(u)
            except (OSError, tarfile.TarError):
                pass  # unreadable: its size stays unknown, the reader counts what fails
    return out


def _sum_bad(parts: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for p in parts:
        for k, v in p.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
    return {"counts": counts, "names": [n for p in parts for n in p.get("names", [])]}


def _worker_slot() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id % (_SLOTS - 1)


class ShardReader(IterableDataset):
    """Streaming reader of webdataset shards, for any modality: subclasses implement
    ``decode(sample) -> item or None`` (None = skipped, and counted by the subclass).

    * The epoch is a list of shards in an order that is a function of (seed, epoch) only,
      each read in its stored order through a shuffle buffer seeded by (seed, epoch, url):
      the epoch's global sample order (:mod:`unipred.data.elastic`). The epoch is
      ``set_epoch``'s value plus the passes started since, so it advances by itself when
      nobody calls ``set_epoch`` and stays exact when the engine does.
    * Readers (ranks ``RANK``/``WORLD_SIZE`` or torch.distributed, times DataLoader workers)
      take contiguous ranges of that order, each a whole number of batches once the loader
      has told the batch size (``resume(0, batch_size)``), the same number on every rank.
    * ``stream_state`` / ``load_stream_state``: the part of the epoch the trained batches had
      not consumed, as segments any world size and worker count can split again (elastic
      resume). ``resume(batches, batch_size)`` is the older same-world-size contract of
      :class:`unipred.loader.ResumableStream`: skip what this rank's workers delivered.
    * A shard that cannot be read (404, truncated, a store that stays away longer than
      ``network.deadline``) is skipped and counted by URL; a reader that falls short ends
      short, and on several ranks the loader keeps the ranks in step without repeating a
      sample (:mod:`unipred.data.uneven`). Only an epoch length given for shards of unknown
      size (``data.num_samples``) is filled by re-reading samples (counted as repeated).
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
        network: NetworkPolicy | None = None,
    ):
        self.spec, self.urls = spec, resolve_shards(spec)
        meta = shard_metadata(spec)
        self.sizes = shard_sizes(self.urls, meta)
        self.known = len(self.sizes) == len(self.urls)
        self.num_samples = sum(self.sizes.values()) if self.known else None
        self.num_samples = self.num_samples or num_samples or meta.get("num_samples")
        self.classes = meta.get("classes", [])
        self.transform, self.training = transform, training
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.counter = counter or COUNTER
        self.network = network or NetworkPolicy.from_env()
        # what is left of a resumed epoch: {"epoch", "segments"} and, resumed on the same
        # ranks and workers, each reader's own rest ("readers", "rotation")
        self._plan: dict | None = None
        # shared memory: set_epoch/resume in the main process must reach the workers, and what
        # the workers read must reach the main process when it writes a checkpoint
        # [epoch base, epoch to skip in, batches to skip, batch size (0: not told)]
        self._state = torch.tensor([0, -1, 0, 0], dtype=torch.int64).share_memory_()
        self._passes = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()
        # per worker, per batch it delivered: [epoch, batch, segment index, position, done]
        self._ring = torch.full((_SLOTS, _RING, 5), -1, dtype=torch.int64).share_memory_()
        self._ended = torch.full((_SLOTS, 2), -1, dtype=torch.int64).share_memory_()
        # per worker, per batch: its bad-sample counts then (accounting.progress), so a
        # checkpoint keeps exactly those of the batches trained on
        self._ring_bad = torch.zeros(_SLOTS, _RING, _REASONS + 1, dtype=torch.int64)
        self._ring_bad.share_memory_()

    # -- the resume contracts -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Fix the shuffling epoch of the next pass (the engine calls this at epoch start)."""
        self._state[0] = int(epoch)
        self._passes.zero_()

    def resume(self, batches: int, batch_size: int) -> None:
        """This rank's loader had consumed ``batches`` batches of ``batch_size`` in the
        current epoch (``set_epoch``'s), on the same world size: skip them.
        ``resume(0, batch_size)`` only tells the batch size, so every worker delivers whole
        batches."""
        if batch_size < 1 or batches < 0:
            raise ValueError(f"resume: batches={batches}, batch_size={batch_size}")
        self._state[1] = int(self._state[0])
        self._state[2] = int(batches)
        self._state[3] = int(batch_size)

    def epoch_segments(self, epoch: int) -> list:
        """The segments of ``epoch``: what is left of it after a resume, else every shard."""
        if self._plan is not None and self._plan["epoch"] == epoch:
            return self._plan["segments"]
        return elastic.epoch_segments(self.urls, self.sizes, self.seed, epoch, self.training)

    def _own_rest(self, epoch: int) -> bool:
        p = self._plan
        return p is not None and p["epoch"] == epoch and p.get("readers") is not None

    def _rotation(self, epoch: int) -> int:
        return int(self._plan["rotation"]) if self._own_rest(epoch) else 0

    def _reader_plan(self, epoch, rank, world, role, workers, bs):
        """-> (segments, quota, stride, offset) of reader ``role`` of ``rank``."""
        if self._own_rest(epoch):
            segs, quota = self._plan["readers"][rank * workers + role]
            return [tuple(x) for x in segs], quota, 1, 0
        segs = self.epoch_segments(epoch)
        return elastic.assign(segs, rank, world, role, workers, bs, self.training)

    def stream_state(self, epoch: int, consumed: int, world: int, rank: int, workers: int):
        """What is left of ``epoch`` after this rank's loader took ``consumed`` batches (in
        the main process, while writing a checkpoint; gathers every rank's part, so every
        rank must call it). None when the position is not world-size free (shard sizes
        unknown and fewer shards than readers)."""
        segs, bs, nw = self.epoch_segments(epoch), max(1, int(self._state[3])), max(1, workers)
        slots = [0] if workers == 0 else [1 + w % (_SLOTS - 1) for w in range(nw)]
        ended = {w: int(self._ended[s, 1]) for w, s in enumerate(slots)
                 if int(self._ended[s, 0]) == epoch}  # fmt: skip
        taken = elastic.consumed_per_worker(consumed, nw, ended)
        rot = self._rotation(epoch)
        parts, readers = [], []
        for w, slot in enumerate(slots):
            role = (w + rot) % nw
            mine, quota, stride, _ = self._reader_plan(epoch, rank, world, role, nw, bs)
            if stride > 1:
                return None
            left = mine
            if taken[w]:
                e = self._ring[slot, (taken[w] - 1) % _RING].tolist()
                if e[0] != epoch or e[1] != taken[w]:
                    raise RuntimeError(f"{self.spec}: no record of worker {w}'s batch {taken[w]}"
                                       f" of epoch {epoch} (found {e[:2]})")  # fmt: skip
                left = elastic.remaining(mine, e[2], e[3], bool(e[4]))
            parts.append(left)
            rest = None if quota is None else max(0, quota - taken[w] * bs)
            readers.append((role, [list(x) for x in left], rest))
        mine_readers = [[segs_, rest] for _, segs_, rest in sorted(readers)]
        bad = [(slot, self._ring_bad[slot, (taken[w] - 1) % _RING])
               for w, slot in enumerate(slots) if taken[w]]  # fmt: skip
        bad = self.counter.consumed(bad) if hasattr(self.counter, "consumed") else {}
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * world
            torch.distributed.all_gather_object(every, (parts, mine_readers, bad))
            parts = [p for rank_parts, _, _ in every for p in rank_parts]
            mine_readers = [r for _, rank_readers, _ in every for r in rank_readers]
            bad = _sum_bad([b for _, _, b in every])
        left = elastic.merge(parts, [u for u, _, _ in segs])
        return {"epoch": int(epoch), "segments": [list(x) for x in left], "world": world,
                "workers": nw, "batch_size": bs, "rotation": (rot + consumed) % nw,
                "readers": mine_readers, "bad": bad}  # fmt: skip

    def load_stream_state(self, state: dict, world: int, batch_size: int, workers: int) -> int:
        """Continue the epoch of ``state`` (from :meth:`stream_state`, any world size) with
        what it had left; returns the epoch the next pass reads (the next one when too little
        was left for a batch on every rank). On the same ranks, workers and batch size each
        reader goes on with its own rest, so the batches come in the uninterrupted order;
        otherwise the rest is split again."""
        epoch, segs = int(state["epoch"]), [tuple(x) for x in state["segments"]]
        self._state[3] = int(batch_size)
        if self.training and elastic.total(segs) // world // batch_size == 0:
            self._plan = None
            self.set_epoch(epoch + 1)
            return epoch + 1
        same = (state.get("world"), state.get("workers"), state.get("batch_size")) == (
            world, max(1, workers), batch_size)  # fmt: skip
        self._plan = {"epoch": epoch, "segments": segs,
                      "readers": state.get("readers") if same else None,
                      "rotation": int(state.get("rotation", 0)) if same else 0}  # fmt: skip
        dist = torch.distributed
        first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        if state.get("bad") and first and hasattr(self.counter, "restore_stream"):
            # what the trained batches had counted (every rank's, summed: rank 0 holds it)
            self.counter.restore_stream(self.spec, state["bad"])
        self.set_epoch(epoch)
        return epoch

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"{self.spec}: number of samples unknown (no meta.json)")
        return self.num_samples // pytorch_worker_info()[1]

    # -- reading --------------------------------------------------------------------------
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

    def _next_epoch(self, worker: int) -> int:
        slot = worker % len(self._passes)
        k = int(self._passes[slot])
        self._passes[slot] += 1
        return int(self._state[0]) + k

    def _open(self, url: str):
        if url.startswith("pipe:"):
            from webdataset.gopen import gopen

            return gopen(url)
        return open_shard(url, self.network)

    def _tar(self, url: str, stream, failure: list):
        """The samples of one tar stream in stored order. A read error ends the shard; the
        sample it cut is dropped (it may lack a part), the error goes to ``failure``. A shard
        that ends short of its known size lost its tail: its last sample is dropped too (tar
        in stream mode ends silently when a cut falls between two members)."""
        cur, n, size = None, 0, self.sizes.get(url)
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for info in tf:
                    if not info.isreg():
                        continue
                    key, suffix = base_plus_ext(info.name)
                    data = tf.extractfile(info).read()
                    if len(data) != info.size:  # stream mode reads a cut member short, silently
                        raise tarfile.ReadError(f"{info.name}: unexpected end of data")
                    tf.members = []  # stream mode: keep no headers around
                    if key is None or key.startswith("__"):
                        continue
                    if cur is not None and key != cur["__key__"]:
                        n += 1
                        yield cur
                        cur = None
                    if cur is None:
                        cur = {"__key__": key, "__url__": url}
                    cur[suffix.lower()] = data
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            failure.append(e)
            cur = None
        try:
            stream.close()  # a pipe reports its command's failure here
        except OSError as e:
            failure.append(e)
            cur = None
        if cur is not None and size is not None and n + 1 < size:
            failure.append(tarfile.ReadError(f"ends after {n + 1} of {size} samples"))
            cur = None
        if cur is not None:
            yield cur

    def _segment(self, url: str, a: int, b: int, epoch: int, stride: int, offset: int):
        """(position after, raw sample) for positions a..b-1 of ``url``'s sample sequence;
        what the shard could not deliver is counted under its URL."""
        failure, pos = [], 0
        try:
            stream = self._open(url)
        except (ShardGone, OSError) as e:
            failure.append(e)
            samples = iter(())
        else:
            samples = self._tar(url, stream, failure)
        if self.training and self.shuffle_buffer > 1:
            rng = random.Random(self.seed * 1_000_003 + epoch * 7919 + zlib.crc32(url.encode()))
            samples = wds.filters._shuffle(
                samples, self.shuffle_buffer, min(1000, self.shuffle_buffer), rng
            )
        for pos, raw in enumerate(samples, start=1):
            if b >= 0 and pos > b:
                return
            if pos <= a or (stride > 1 and (pos - 1) % stride != offset):
                continue
            yield pos, raw
        missing = b - max(pos, a) if b >= 0 else 0
        if missing > 0 or (failure and b < 0):
            gone = isinstance(failure[0], ShardGone) if failure else False
            reason = "shard_gone" if gone or (failure and pos == 0) else "truncated"
            detail = failure[0] if failure else f"ended after {pos} of {b} samples"
            self.counter.count(reason, url, detail, n=max(missing, 1))

    def _record(self, slot: int, epoch: int, k: int, si: int, pos: int, done: bool) -> None:
        self._ring[slot, (k - 1) % _RING] = torch.tensor([epoch, k, si, pos, int(done)])
        if hasattr(self.counter, "progress"):
            self._ring_bad[slot, (k - 1) % _RING] = self.counter.progress()

    def __iter__(self):
        rank, world, worker, workers = pytorch_worker_info()
        slot = _worker_slot()
        epoch = self._next_epoch(worker)
        # a resumed epoch: the DataLoader takes its first batch from worker 0, but batch b of
        # the interrupted epoch was worker b % W's: worker w reads worker (w + b) % W's
        # share, so the batches come in the uninterrupted order
        role = (worker + self._rotation(epoch)) % workers
        if int(self._state[1]) == epoch:  # resume(b, bs)
            role = (role + int(self._state[2])) % workers
        self._ended[slot] = torch.tensor([-1, -1])
        bs = max(1, int(self._state[3]))
        mine, quota, stride, offset = self._reader_plan(epoch, rank, world, role, workers, bs)
        if quota is not None and quota <= 0:
            self._ended[slot] = torch.tensor([epoch, 0])
            return
        # a reader that falls short ends short: the loader keeps the ranks in step
        # (unipred.data.uneven); samples are re-read only to fill an epoch length the user gave
        pad = False
        if quota is None and self.training and self.num_samples and not self.known:
            # sizes unknown: the epoch length the user gave (data.num_samples), re-reading to fill it
            batches = self.num_samples // world // bs
            quota = elastic.batches_per_worker(batches, workers)[role] * bs
            pad = True
        skip = 0
        if int(self._state[1]) == epoch:  # resume(batches, bs): the same-world-size contract
            skip = len(range(role, int(self._state[2]), workers)) * bs
        produced, si, pos = 0, 0, 0
        for rep in range(1000):
            got = 0
            for si, (url, a, b) in enumerate(mine):
                for pos, raw in self._segment(url, a, b, epoch, stride, offset):
                    got += 1
                    # each sample counts once per epoch: in the first pass over the shards. Its
                    # random choices are a function of (seed, epoch, sample key, pass), not of
                    # this worker's stream (unipred.data.seeding)
                    with seeded(self.seed, epoch, str(raw.get("__key__", "")), rep):
                        out = self._decode_once(raw, count=rep == 0)
                    if out is None:
                        continue
                    if produced < skip:  # resumed: delivered before the restart. Decoded and
                        produced += 1  # counted again, so the epoch's report is whole
                        continue
                    if rep:
                        self.counter.count("repeated", url)
                    if produced % bs == 0:  # a batch's first sample names it: seeds its collate
                        stream_batch(self.seed, epoch, str(raw.get("__key__", "")), rep)
                    produced += 1
                    if produced % bs == 0:  # the loader's batch ends here: where we stand
                        self._record(slot, epoch, produced // bs, si, pos, rep > 0)
                    yield out
                    if quota is not None and produced >= quota:
                        self._ended[slot] = torch.tensor([epoch, produced // bs])
                        return
            if not pad or got == 0 or produced >= quota:
                break
        k = math.ceil(produced / bs)
        self._record(slot, epoch, k, si, pos, True)
        self._ended[slot] = torch.tensor([epoch, k])
