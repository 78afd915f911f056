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

import logging
import os

from torch.utils.data import Dataset
from unipred.tasks.image.decode import decode_image

from unipred.data.accounting import COUNTER, BadSampleCounter
from unipred.data.book import SampleBook
from unipred.data.scan import Scan, ScanReport, list_dir, log_classes, read_regular
from unipred.data.shards import (  # noqa: F401  (re-exported for the image readers' users)
    _SILENT,
    ShardReader,
    is_shard_spec,
    resolve_shards,
    shard_metadata,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
# webdataset sample keys that may hold an image (the packer uses the real format's name)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "img")


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
    """Class sub-folders (sorted names -> 0..C-1) -> (samples, classes, n_ignored_files).

    Walked by :class:`unipred.data.scan.Scan`: each file once, no symlink loop, no link out
    of ``root`` unless ``data.follow_symlinks``, no FIFO; what was left out is logged."""
    report = ScanReport()
    classes = [e.name for e in list_dir(root, report) if e.is_dir(follow_symlinks=True)]
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (and no label_file for a flat folder)")
    scan = Scan(root, report=report)
    for idx, name in enumerate(classes):
        scan.add(os.path.join(root, name), idx)
    samples, ignored = [], 0
    for path, idx in scan.finish():
        if is_image_file(path):
            samples.append((path, idx))
        else:
            ignored += 1
    if report.line():
        log.warning("%s: %s", root, report.line())
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
    for f in sorted(e.name for e in list_dir(root) if not e.is_dir(follow_symlinks=True)):
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


class ImageFolderDataset(Dataset):
    """Map-style reader of an image tree; returns ``(transform(img), label)``.

    A bad file is recorded in the reader's :class:`~unipred.data.book.SampleBook` (once per
    epoch, under one reason, with its name) and replaced by the next readable file, so
    batches stay full and the default collate works; however many bad files follow each
    other, the epoch goes on (the engine stops a run only above ``data.max_bad_fraction``).
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
        log_classes(root, [y for _, y in self.samples], self.classes, "images")
        self.root, self.transform, self.min_size = root, transform, min_size
        self.counter = counter or COUNTER
        self.book = SampleBook(self.samples, root, self.counter)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int, counter=None):
        """PIL RGB image of sample i, or None (counted) if it is unusable."""
        counter = counter or self.book.at(i)
        path = self.samples[i][0]
        try:
            data = read_regular(path)
        except OSError as e:
            counter.count("read_error", path, e)
            return None
        if _wants_bytes(self.transform):  # decoded on the device later (data.decode_on_device)
            return self.transform.from_bytes(data, path, self.min_size, counter)
        return decode_image(data, path, self.min_size, counter)

    def _fetch(self, j: int, counter):
        img = self.load(j, counter)
        if img is None:
            return None
        plain = self.transform is None or _wants_bytes(self.transform)
        return (img if plain else self.transform(img)), self.samples[j][1]

    def __getitem__(self, i: int):
        # a substitute is recorded when its own index comes up, so each file counts once
        return self.book.first_good(i, self._fetch)


class ShardDataset(ShardReader):
    """Streaming image shards -> ``(transform(img), label)`` (label -1 if none); images
    smaller than ``min_size`` are skipped. Splitting, shuffling, quotas and exact resume are
    :class:`unipred.data.shards.ShardReader`'s."""

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
        super().__init__(spec, transform, training, shuffle_buffer, seed, num_samples, counter)
        self.min_size = min_size

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
