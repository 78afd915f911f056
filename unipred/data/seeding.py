"""Per-sample randomness: every random choice of a data pipeline is a function of
(run seed, epoch, sample), never of a DataLoader worker's running random stream.

Why: a worker's stream depends on how many workers there are, on which worker a sample lands
and on everything that worker drew before. A resumed run restarts its workers, so a crop drawn
from that stream differs from the uninterrupted run's, and 0, 1 and 3 workers see different
augmentations of the same batch. Seeding each sample from its identity makes the augmented
batch the same whatever the worker count and after any restart.

:func:`seeded` is the one tool: inside ``with seeded(run_seed, epoch, index):`` torch's CPU
generator, Python's ``random`` and NumPy's global generator are seeded from the key, and all
three are put back afterwards (the caller's streams are untouched). Transforms that draw from
the global generators (torchvision, timm, ``random.random()``) need no change.

The engine applies it for you: map-style training data is read through :class:`SeededDataset`
(the loader's sampler hands each worker ``(epoch, index)`` keys, so the epoch reaches
persistent workers), and the shipped stream readers (``unipred.data.shards.ShardReader``,
the joint stream) seed each sample themselves. A plugin's own ``IterableDataset`` does the
same around each sample it produces (docs/adding-a-modality.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct

import torch
from torch.utils.data import Dataset

try:
    import numpy as np
except ImportError:  # numpy is optional for the core
    np = None


def sample_seed(*key) -> int:
    """A 63-bit seed from a key of ints and strings, e.g. ``(run_seed, epoch, index)``.

    A hash, not a sum: (seed 1, epoch 2) and (seed 2, epoch 1) must not share a crop, and the
    value must be the same in every process (Python's ``hash`` of a str is salted per run)."""
    h = hashlib.blake2b(digest_size=8)
    for part in key:
        if isinstance(part, str):
            h.update(b"s" + part.encode("utf-8", "surrogatepass") + b"\0")
        else:
            h.update(b"i" + struct.pack("<q", int(part)))
    return int.from_bytes(h.digest(), "little") >> 1


@contextlib.contextmanager
def seeded(*key):
    """Seed torch's CPU generator, ``random`` and NumPy's global generator from ``key`` for
    the body, then restore the three states. CUDA generators are left alone."""
    s = sample_seed(*key)
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state() if np is not None else None
    torch.default_generator.manual_seed(s)
    random.seed(s)
    if np is not None:
        np.random.seed(s % 2**32)
    try:
        yield s
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """A map-style dataset read with keys ``(epoch, index)``: sample ``index`` is read inside
    ``seeded(seed, epoch, index)``. The engine's training loader wraps every map-style set in
    it (its sampler yields the keys); other attributes are the wrapped dataset's.

    ``__getitems__`` (one call per batch, in the worker) returns the batch as a
    :class:`SeededBatch`, which carries the key of its first sample, so that
    :class:`SeededCollate` can seed batch-level choices (mixup, cutmix) the same way. A set
    whose samples draw nothing random says so with ``per_sample_random = False``: its samples
    are then read unseeded (seeding costs about 0.1 ms a sample: 14 ms of the Fashion-MNIST
    demo's ~200 ms step at batch 128) and its batch-level collate is still seeded."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with seeded(self.seed, epoch, index):
            return self.dataset[index]

    def __getitems__(self, keys):
        if getattr(self.dataset, "per_sample_random", True):
            out = SeededBatch(self[k] for k in keys)
        else:  # its samples draw nothing random: seeding each one would only cost time
            out = SeededBatch(self.dataset[index] for _, index in keys)
        out.key = (self.seed, *keys[0], "batch") if keys else None
        return out

    def __getattr__(self, name):
        if name in ("dataset", "seed"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededBatch(list):
    """The samples of one batch, plus ``key``: the seed key of its batch-level choices."""

    key: tuple | None = None


# The batch a stream reader is producing in this process (a DataLoader worker, or the main
# process without workers): the fetcher pulls a batch's samples, then collates them, so the key
# set at the batch's first sample is that batch's. Taken (and cleared) by SeededCollate.
_STREAM_BATCH: list = [None]


def stream_batch(*key) -> None:
    """A stream reader calls this as it yields the first sample of a batch, so that the
    batch's collate (mixup, cutmix) is seeded by ``key`` (e.g. seed, epoch, rank and worker
    role, batch number) rather than by the worker's running generator."""
    _STREAM_BATCH[0] = (*key, "batch")


class SeededCollate:
    """Runs ``collate_fn`` (default: torch's ``default_collate``) inside ``seeded(batch key)``
    when the batch carries one (:class:`SeededBatch`) or a stream reader announced it
    (:func:`stream_batch`), so random batch-level choices are a function of the batch too."""

    def __init__(self, collate_fn=None):
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, items):
        key = getattr(items, "key", None)
        if key is None:
            key, _STREAM_BATCH[0] = _STREAM_BATCH[0], None
        if key is None:
            return self.collate_fn(items)
        with seeded(*key):
            return self.collate_fn(list(items))
