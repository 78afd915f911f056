"""Image readers: ImageFolder trees and streaming webdataset shards.

``image_dataset(spec, transform, training)`` picks the reader from the spec:

* a folder with class sub-folders (ImageNet's ILSVRC2012 train layout, or val sorted into
  class folders) -> :class:`ImageFolderDataset` (map-style);
* a flat folder of images plus ``label_file`` (ImageNet val) -> :class:`ImageFolderDataset`;
* a folder of ``*.tar`` shards, a brace pattern (``/d/train-{000000..000127}.tar``), a
  ``pipe:`` command or a URL (``https://...``, ``gs://...`` via webdataset's ``gopen``)
  -> :class:`ShardDataset` (iterable, streaming).

Every image goes through :func:`unipred.tasks.image.decode.decode_image`, so bad files are
skipped or converted and counted, never fatal.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random

import torch
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset
from unipred.tasks.image.decode import decode_image
from webdataset.utils import pytorch_worker_info

from unipred.data.accounting import COUNTER, BadSampleCounter

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
# webdataset sample keys that may hold an image (the packer uses the real format's name)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "img")
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------- label files
def read_classes(path: str) -> list[str]:
    """A classes file (one class name per line, line i = label i; the packer writes one)."""
    with open(path) as f:
        classes = [ln.strip() for ln in f if ln.strip()]
    if not classes:
        raise ValueError(f"classes file {path} is empty")
    return classes


def read_label_file(path: str) -> dict[str, str]:
    """Label file -> {file name or stem: label (class name or integer index)}.

    Accepted: ``name label`` or ``name,label`` per line, and Kaggle's ImageNet
    ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first word is the wnid).
    """
    out: dict[str, str] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#") or line.startswith("ImageId,"):
                continue
            parts = line.split(",", 1) if "," in line else line.split(None, 1)
            if len(parts) < 2 or not parts[1].split():
                raise ValueError(
                    f"{path}:{n}: expected 'filename label', got {line!r}. A one-column file "
                    "(the devkit's ILSVRC2012_validation_ground_truth.txt) uses the devkit's own "
                    "class ids, not the sorted-wnid order: use LOC_val_solution.csv or sort val "
                    "into class folders instead"
                )
            out[parts[0].strip()] = parts[1].split()[0]
    if not out:
        raise ValueError(f"label file {path} holds no labels")
    return out


# ------------------------------------------------------------------------- folder trees
def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str], int]:
    """Class sub-folders (sorted names -> 0..C-1) -> (samples, classes, n_ignored_files)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (and no label_file for a flat folder)")
    samples, ignored = [], 0
    for idx, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for f in sorted(files):
                if is_image_file(f):
                    samples.append((os.path.join(dirpath, f), idx))
                elif not f.startswith("."):
                    ignored += 1
    if not samples:
        raise ValueError(f"{root}: class folders hold no image files ({IMAGE_EXTENSIONS})")
    return samples, classes, ignored


def scan_flat_folder(
    root: str, label_file: str, classes: list[str] | None = None
) -> tuple[list[tuple[str, int]], list[str], int]:
    """Flat folder + label file (see :func:`read_label_file`) -> (samples, classes, n_ignored)."""
    labels = read_label_file(label_file)
    if classes is None:
        names = {v for v in labels.values() if not v.isdigit()}
        # integer labels are used as they are; names map to sorted order (= ImageFolder's)
        classes = sorted(names) if names else []
    index = {c: i for i, c in enumerate(classes)}
    samples, ignored, unlabeled = [], 0, 0
    for f in sorted(os.listdir(root)):
        if not is_image_file(f):
            ignored += not f.startswith(".")
            continue
        lab = labels.get(f, labels.get(os.path.splitext(f)[0]))
        if lab is None:
            unlabeled += 1
            continue
        if lab.isdigit():
            samples.append((os.path.join(root, f), int(lab)))
        elif lab in index:
            samples.append((os.path.join(root, f), index[lab]))
        else:
            raise ValueError(f"{label_file}: label {lab!r} of {f} is not a known class")
    if unlabeled:
        log.warning(
            "%s: %d images have no entry in %s and are left out", root, unlabeled, label_file
        )
    if not samples:
        raise ValueError(f"{root}: no image in this folder matches an entry of {label_file}")
    return samples, classes, ignored + unlabeled


def _wants_bytes(transform) -> bool:
    """Transforms that take the encoded file (device decoding) rather than a PIL image."""
    return bool(getattr(transform, "wants_bytes", False))


class _Silent:
    def count(self, *args, **kwargs):
        pass


_SILENT = _Silent()


class ImageFolderDataset(Dataset):
    """Map-style reader of an image tree; returns ``(transform(img), label)``.

    A bad file is counted and replaced by the next good one (so batches stay full and the
    default collate works); the count, not the substitution, is what gets logged.
    """

    def __init__(
        self,
        root: str,
        transform=None,
        label_file: str = "",
        classes_file: str = "",
        min_size: int = 8,
        counter: BadSampleCounter | None = None,
    ):
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist")
        classes = read_classes(classes_file) if classes_file else None
        if label_file:
            self.samples, self.classes, ignored = scan_flat_folder(root, label_file, classes)
        else:
            self.samples, self.classes, ignored = scan_image_folder(root)
            if classes is not None and classes != self.classes:
                raise ValueError(f"{root}: class folders differ from {classes_file}")
        if ignored:
            log.warning("%s: %d files without an image extension were ignored", root, ignored)
        self.root, self.transform, self.min_size = root, transform, min_size
        self.counter = counter or COUNTER

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int, counter=None):
        """PIL RGB image of sample i, or None (counted) if it is unusable."""
        counter = counter or self.counter
        path = self.samples[i][0]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            counter.count("read_error", path, e)
            return None
        if _wants_bytes(self.transform):  # decoded on the device later (data.decode_on_device)
            return self.transform.from_bytes(data, path, self.min_size, counter)
        return decode_image(data, path, self.min_size, counter)

    def __getitem__(self, i: int):
        for k in range(min(len(self), 64)):
            j = (i + k) % len(self)
            # a substitute is counted when its own index comes up, so each file counts once
            img = self.load(j, None if k == 0 else _SILENT)
            if img is not None:
                plain = self.transform is None or _wants_bytes(self.transform)
                return (img if plain else self.transform(img)), self.samples[j][1]
        raise RuntimeError(f"{self.root}: 64 consecutive unreadable images from index {i}")


# ------------------------------------------------------------------------------ shards
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


class ShardDataset(IterableDataset):
    """Streaming reader of webdataset shards -> ``(transform(img), label)`` (label -1 if none).

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
      whether it was good, so the resumed epoch continues exactly where the interrupted
      one stopped: no sample repeated, none lost.
    """

    def __init__(
        self,
        spec: str,
        transform=None,
        training: bool = True,
        shuffle_buffer: int = 5000,
        seed: int = 0,
        num_samples: int | None = None,
        min_size: int = 8,
        counter: BadSampleCounter | None = None,
    ):
        self.spec, self.urls = spec, resolve_shards(spec)
        meta = shard_metadata(spec)
        self.num_samples = num_samples or meta.get("num_samples")
        self.classes = meta.get("classes", [])
        self.transform, self.training, self.min_size = transform, training, min_size
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

    def _assign(self, epoch: int):
        """-> (my shard urls, sample stride, sample offset, quota or None, samples to skip)."""
        rank, world, worker, workers = pytorch_worker_info()
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
        """A raw webdataset sample dict -> (image, label) or None (counted)."""
        what = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            self.counter.count("corrupt", what)
            return None
        label = int(sample["cls"]) if "cls" in sample else -1
        if _wants_bytes(self.transform):  # decoded on the device later (data.decode_on_device)
            enc = self.transform.from_bytes(sample[key], what, self.min_size, self.counter)
            return None if enc is None else (enc, label)
        img = decode_image(sample[key], what, self.min_size, self.counter)
        if img is None:
            return None
        return (self.transform(img) if self.transform is not None else img), label

    def _good(self, raw: dict) -> bool:
        """Whether ``raw`` decodes (for skipping on resume; counted in the first run only)."""
        counter, self.counter = self.counter, _SILENT
        try:
            return self.decode(raw) is not None
        finally:
            self.counter = counter

    def __iter__(self):
        info = pytorch_worker_info()
        epoch = self._next_epoch(info[2])
        urls, stride, offset, quota, skip = self._assign(epoch)
        if quota is not None and skip >= quota:
            return  # this worker had delivered all of its share before the restart
        rng = random.Random(hash((self.seed, epoch, info)))  # ints only: stable across runs
        produced, passes = 0, 0
        while quota is None or produced < quota:
            got = 0
            for raw in self._raw(urls, stride, offset, rng):
                got += 1
                if produced < skip:  # resumed: delivered before the restart
                    produced += self._good(raw)
                    continue
                out = self.decode(raw)
                if out is None:
                    continue
                yield out
                produced += 1
                if quota is not None and produced >= quota:
                    return
            passes += 1
            if quota is None or got == 0 or passes > 1000:
                return  # one pass (evaluation), or nothing readable at all


def image_dataset(
    spec: str,
    transform=None,
    training: bool = True,
    label_file: str = "",
    classes_file: str = "",
    shuffle_buffer: int = 5000,
    seed: int = 0,
    num_samples: int | None = None,
    min_size: int = 8,
    counter: BadSampleCounter | None = None,
):
    """Build the right reader for ``spec`` (see the module docstring)."""
    if not spec:
        raise ValueError("empty data path")
    if is_shard_spec(spec):
        return ShardDataset(
            spec, transform, training, shuffle_buffer, seed, num_samples, min_size, counter
        )
    return ImageFolderDataset(spec, transform, label_file, classes_file, min_size, counter)
