"""Pack an image folder (ImageNet layout) into shuffled webdataset shards.

``unipred data pack-images SRC OUT`` reads SRC as an ImageFolder tree (class sub-folders,
e.g. ILSVRC2012 train) or, with ``--label-file``, a flat folder (e.g. ILSVRC2012 val), and
writes ``OUT/<prefix>-000000.tar ...`` plus ``OUT/meta.json`` and ``OUT/classes.txt``.

* The original encoded bytes are stored unchanged (no re-encoding, no quality loss), under
  the key of their real format (``jpg``, ``png``, ...; ImageNet has PNGs named .JPEG);
  ``cls`` holds the integer label and ``json`` the source path and class name.
* The file list is shuffled with ``--seed`` before writing, so every shard mixes classes.
* With verification on (the default), every image is decoded once: unreadable, truncated
  and tiny images are left out and counted; grayscale/CMYK/16-bit images are kept as they
  are (the reader converts and counts them).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter

import webdataset as wds
from PIL import Image
from unipred.tasks.image.data import read_classes, scan_flat_folder, scan_image_folder
from unipred.tasks.image.decode import decode_image

from unipred.data.shards import folder_shard_samples

_FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
_FORMAT_KEYS.update({"GIF": "gif", "PPM": "ppm", "MPO": "jpg"})  # MPO: multi-picture JPEG


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pack-images`` options."""
    p.add_argument("src", help="image folder: class sub-folders, or flat with --label-file")
    p.add_argument("out", help="output folder for the shards (one split per folder)")
    p.add_argument(
        "--label-file",
        default="",
        help="labels of a flat folder: 'name label' lines or LOC_val_solution.csv",
    )
    p.add_argument(
        "--classes", default="", help="classes.txt fixing the label order (e.g. the train split's)"
    )
    p.add_argument(
        "--prefix", default="", help="shard name prefix (default: the output folder's name)"
    )
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="max shard size in MB")
    p.add_argument("--max-per-shard", type=int, default=100_000, help="max samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--min-size", type=int, default=8, help="skip images with a side below this")
    p.add_argument("--no-verify", action="store_true", help="do not decode images while packing")
    p.add_argument("--limit", type=int, default=0, help="pack only the first N (after shuffling)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")


class _Reasons:
    """A stand-in counter for worker processes: records reasons, returned to the parent."""

    def __init__(self):
        self.reasons: list[str] = []

    def count(self, reason, what="", exc=None):
        self.reasons.append(reason)


def _load(job: tuple[str, int, int, bool]):
    """Read (and optionally verify) one file -> (data|None, format key|None, reasons)."""
    path, _, min_size, verify = job
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None, None, ["read_error"]
    if not verify:
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        return data, {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext), []
    rec = _Reasons()
    if decode_image(data, path, min_size, rec) is None:
        return None, None, rec.reasons
    fmt = Image.open(io.BytesIO(data)).format or "JPEG"
    return data, _FORMAT_KEYS.get(fmt, fmt.lower()), rec.reasons


def _samples(args) -> tuple[list[tuple[str, int]], list[str]]:
    classes = read_classes(args.classes) if args.classes else None
    if args.label_file:
        samples, classes, _ = scan_flat_folder(args.src, args.label_file, classes)
    else:
        samples, found, _ = scan_image_folder(args.src)
        if classes is not None and classes != found:
            raise ValueError(f"{args.src}: class folders differ from {args.classes}")
        classes = found
    return samples, classes


def _prepare_out(args) -> str:
    os.makedirs(args.out, exist_ok=True)
    old = [f for f in os.listdir(args.out) if f.endswith(".tar")]
    if old and not args.overwrite:
        raise ValueError(f"{args.out} already holds {len(old)} shards; use --overwrite")
    for f in old:
        os.remove(os.path.join(args.out, f))
    prefix = args.prefix or os.path.basename(os.path.normpath(args.out)) or "shard"
    return prefix


def pack(args: argparse.Namespace) -> dict:
    """Pack ``args.src`` into ``args.out``; returns the metadata also written to meta.json."""
    samples, classes = _samples(args)
    random.Random(args.seed).shuffle(samples)
    if args.limit:
        samples = samples[: args.limit]
    prefix = _prepare_out(args)
    pattern = os.path.join(args.out, f"{prefix}-%06d.tar")
    jobs = [(p, y, args.min_size, not args.no_verify) for p, y in samples]
    counts: Counter = Counter()  # reason -> files, each file under one reason
    left_out: Counter = Counter()  # the reasons of the files not written
    n, t0 = 0, time.time()
    writer = wds.ShardWriter(
        pattern, maxcount=args.max_per_shard, maxsize=args.shard_size_mb * 1e6, verbose=0
    )
    pool = _context().Pool(args.workers) if args.workers > 1 else None
    results = pool.imap(_load, jobs, chunksize=32) if pool else map(_load, jobs)
    try:
        for (path, label), (data, key, reasons) in zip(samples, results):
            reason = (reasons or ["corrupt" if data is None else ""])[0]
            if reason:
                counts[reason] += 1
            if data is None:
                left_out[reason] += 1
                continue
            rel = os.path.relpath(path, args.src)
            stem = os.path.splitext(os.path.basename(path))[0].replace(".", "_")
            meta = {"path": rel, "class": classes[label] if label < len(classes) else str(label)}
            writer.write({"__key__": f"{n:09d}_{stem}", key: data, "cls": str(label), "json": meta})
            n += 1
            if n % 10000 == 0:
                print(f"  {n}/{len(samples)} images, {time.time() - t0:.0f} s", file=sys.stderr)
    finally:
        n_shards = writer.shard  # close() deletes the attribute
        writer.close()
        if pool:
            pool.close()
    return _write_meta(args, prefix, n_shards, n, classes, counts, left_out)


def _write_meta(args, prefix, n_shards, n, classes, counts, left_out) -> dict:
    shards = [f"{prefix}-{i:06d}.tar" for i in range(n_shards)]
    meta = {
        "num_samples": n,
        "num_shards": n_shards,
        "pattern": os.path.join(args.out, f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar"),
        "shards": shards,
        "shard_samples": folder_shard_samples(args.out),
        "classes": classes,
        "source": os.path.abspath(args.src),
        "seed": args.seed,
        "bad_samples": dict(counts),
        # what the summary says: files not written (by reason), and written files the
        # reader will convert (by reason); each file under one reason
        "left_out": dict(left_out),
        "kept_for_conversion": dict(counts - left_out),
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(args.out, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in classes))
    return meta


def run(args: argparse.Namespace) -> int:
    """Entry point of ``unipred data pack-images``."""
    try:
        meta = pack(args)
    except ValueError as e:
        print(f"pack-images: {e}", file=sys.stderr)
        return 2
    left, kept = meta["left_out"], meta["kept_for_conversion"]
    print(
        f"wrote {meta['num_samples']} images in {meta['num_shards']} shards: {meta['pattern']}\n"
        f"left out {sum(left.values())} bad images: {left}\n"
        f"kept for conversion at read time: {sum(kept.values())} images: {kept}"
    )
    return 0


def _context():
    # fork: the workers only run PIL, and fork needs no importable __main__ (spawn would
    # re-run a calling script that lacks the __main__ guard)
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")
