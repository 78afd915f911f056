"""The epoch plan of a shard stream, and its position as a world-size-free record.

An epoch is a list of *segments* ``(url, start, stop)``: positions ``start..stop-1`` of a
shard's sample sequence (``stop = -1``: to its end, when the shard's size is unknown). A fresh
epoch is every shard, whole, in an order that is a function of (seed, epoch) only; a shard's
own sample sequence is a function of (seed, epoch, url) only (its stored order through a
seeded shuffle buffer). Concatenated, they are the epoch's *global sample order*.

Readers (``world`` ranks x ``workers`` DataLoader workers) take contiguous ranges of that
order, rank-major, each a whole number of batches, so every rank gets the same number of
batches. A checkpoint stores which part of each segment the trained batches had consumed
(:func:`remaining`): the rest is again a list of segments, in global order, that any other
number of ranks and workers can split the same way (:func:`assign`). That is what makes a
resume elastic; what it costs: a reader whose range starts inside a shard reads (and drops)
that shard's earlier samples, and a shard cut by a checkpoint is read up to the cut again.

The sizes of the shards must be known for this (the packers' ``meta.json`` lists them as
``shard_samples``; local shards without it are counted when the reader is built). Shards of
unknown size are dealt out whole, round robin, one pass each.
"""

from __future__ import annotations

import random

Segment = tuple[str, int, int]


def epoch_segments(urls, sizes: dict, seed: int, epoch: int, shuffle: bool) -> list[Segment]:
    """Every shard whole, in the epoch's order (a function of ``seed`` and ``epoch`` only)."""
    order = list(urls)
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return [(u, 0, int(sizes.get(u, -1))) for u in order]


def _known(segments) -> bool:
    return all(b >= 0 for _, _, b in segments)


def total(segments) -> int:
    """Samples in ``segments`` (all sizes known)."""
    return sum(b - a for _, a, b in segments)


def _cut(segments, lo: int, hi: int) -> list[Segment]:
    """Global positions ``lo..hi-1`` of the concatenated ``segments``, as segments."""
    out, at = [], 0
    for url, a, b in segments:
        n = b - a
        s, e = max(lo, at), min(hi, at + n)
        if s < e:
            out.append((url, a + s - at, a + e - at))
        at += n
        if at >= hi:
            break
    return out


def batches_per_worker(batches: int, workers: int) -> list[int]:
    """A rank's ``batches`` dealt to its workers as the DataLoader takes them (round robin)."""
    return [batches // workers + (w < batches % workers) for w in range(workers)]


def assign(segments, rank, world, worker, workers, batch_size, training):
    """-> (my segments, my quota of samples or None, stride, offset) for one reader.

    Sizes known: training readers get contiguous whole batches, the same number of batches
    on every rank (the remainder of ``len // (world * batch)`` is left out of the epoch);
    evaluation readers split everything, so each sample is read once. Sizes unknown: whole
    segments round robin (or, with fewer segments than readers, every reader takes every
    ``stride``-th sample)."""
    readers, me = world * workers, rank * workers + worker
    if _known(segments):
        n = total(segments)
        if training:
            per_rank = n // world // batch_size
            counts = batches_per_worker(per_rank, workers)
            lo = (rank * per_rank + sum(counts[:worker])) * batch_size
            quota = counts[worker] * batch_size
            return _cut(segments, lo, lo + quota), quota, 1, 0
        sizes = [n // readers + (r < n % readers) for r in range(readers)]
        lo = sum(sizes[:me])
        return _cut(segments, lo, lo + sizes[me]), None, 1, 0
    if len(segments) >= readers:
        return list(segments[me::readers]), None, 1, 0
    return list(segments), None, readers, me


def consumed_per_worker(consumed: int, workers: int, ended: dict[int, int]) -> list[int]:
    """Batches the loader took from each worker, out of ``consumed`` batches in all.

    The DataLoader asks its workers in turn and leaves out a worker once it has ended;
    ``ended[w]`` is the number of batches worker ``w`` delivered in all, for the workers that
    have ended (the others have delivered more than were taken)."""
    taken, w, left = [0] * workers, 0, consumed
    alive = set(range(workers))
    while left and alive:
        if w in alive:
            if w in ended and taken[w] >= ended[w]:
                alive.discard(w)
            else:
                taken[w] += 1
                left -= 1
        w = (w + 1) % workers
    return taken


def remaining(segments: list[Segment], seg_index: int, pos: int, done: bool) -> list[Segment]:
    """What is left of a reader's ``segments`` when it stood at position ``pos`` of its
    segment ``seg_index`` (``done``: it had read all of them)."""
    if done:
        return []
    if seg_index >= len(segments):
        return []
    url, _, b = segments[seg_index]
    head = [(url, pos, b)] if (b < 0 or pos < b) else []
    return head + list(segments[seg_index + 1 :])


def merge(parts, order: list[str]) -> list[Segment]:
    """The segments of all readers in the global order (``order``: the epoch's URL order)."""
    rank = {u: i for i, u in enumerate(order)}
    segs = [tuple(s) for part in parts for s in part]
    return sorted(segs, key=lambda s: (rank.get(s[0], len(rank)), s[1]))
