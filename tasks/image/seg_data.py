"""Pack ADE20K (or any ADEChallengeData2016-style tree) into webdataset shards.

Reads ``SRC/images/{split}/*.jpg`` + ``SRC/annotations/{split}/*.png`` and writes
``OUT/{split}/{split}-NNNNNN.tar`` (keys: ``jpg`` the original JPEG bytes, ``png`` the original
label PNG) plus ``OUT/{split}/meta.json``. Training shards are shuffled. Every pair is checked
first (header reads only): a missing partner or a label whose size differs from its image is
reported by file name, and packing stops unless ``--skip-bad`` is given.

Readers for training and evaluation (folder or shards) are in the same module.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from unipred.tasks.image.data import ShardDataset, is_shard_spec
from unipred.tasks.image.decode import decode_image
from unipred.tasks.image.seg_transforms import reduce_zero_label

from unipred.data.shards import folder_shard_samples

log = logging.getLogger(__name__)

SPLITS = ("training", "validation")


def scan_pairs(root: str | Path, split: str) -> tuple[list[tuple[Path, Path]], list[str]]:
    """-> (sorted (image, annotation) pairs, problems naming each unpaired file)."""
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a folder (expected the ADEChallengeData2016 "
                                    "layout images/{training,validation}, annotations/...)")  # fmt: skip
    imgs = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    anns = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".png"}
    problems = [
        f"{imgs[k]}: no annotation {ann_dir / (k + '.png')}"
        for k in sorted(imgs.keys() - anns.keys())
    ]
    problems += [
        f"{anns[k]}: no image for this annotation in {img_dir}"
        for k in sorted(anns.keys() - imgs.keys())
    ]
    pairs = [(imgs[k], anns[k]) for k in sorted(imgs.keys() & anns.keys())]
    return pairs, problems


def check_sizes(pairs) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Split pairs into good ones and problems (label size != image size, unreadable)."""
    good, problems = [], []
    for img, ann in pairs:
        try:
            with Image.open(img) as a, Image.open(ann) as b:  # headers only
                si, sa = a.size, b.size
        except OSError as e:
            problems.append(f"{img} / {ann}: unreadable ({e})")
            continue
        if si != sa:
            problems.append(f"{ann}: label size {sa[0]}x{sa[1]} differs from image {img.name} "
                            f"size {si[0]}x{si[1]}")  # fmt: skip
        else:
            good.append((img, ann))
    return good, problems


def checked_pairs(root, split: str, skip_bad: bool = False) -> list[tuple[Path, Path]]:
    """Pairs of ``split``; raises ValueError listing every bad file unless ``skip_bad``."""
    pairs, problems = scan_pairs(root, split)
    pairs, bad_sizes = check_sizes(pairs)
    problems += bad_sizes
    if problems:
        head = "\n  ".join(problems[:50]) + (
            f"\n  ... {len(problems) - 50} more" if len(problems) > 50 else ""
        )
        msg = f"{root} [{split}]: {len(problems)} bad file(s):\n  {head}"
        if not skip_bad:
            raise ValueError(msg + "\n(fix them, or skip them with --skip-bad / data.skip_bad)")
        log.warning("%s\nskipping them", msg)
    if not pairs:
        raise ValueError(f"{root} [{split}]: no image/annotation pairs found")
    return pairs


def read_label(data: bytes | str | Path, what: str = "") -> np.ndarray:
    """A label PNG (8-bit "L" or palette) -> (H, W) uint8 array of raw ids."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    if img.mode not in ("L", "P"):
        raise ValueError(f"{what}: label PNG must be 8-bit grayscale or palette, got {img.mode}")
    return np.array(img, dtype=np.uint8)


def prepare_label(raw: np.ndarray, reduce: bool, ignore_index: int = 255) -> torch.Tensor:
    """Raw ids -> training ids (reduced by one with 0 -> ignore_index, or as they are)."""
    return (
        reduce_zero_label(raw, ignore_index) if reduce else torch.from_numpy(raw.astype(np.int64))
    )


class ADE20KFolder(torch.utils.data.Dataset):
    """Map-style reader of the folder layout -> ``transform(image, label)``."""

    def __init__(
        self, root, split, transform, reduce_labels=True, skip_bad=False, ignore_index=255
    ):
        self.pairs = checked_pairs(root, split, skip_bad)
        self.transform, self.reduce, self.ignore = transform, reduce_labels, ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        img_path, ann_path = self.pairs[i]
        img = decode_image(img_path.read_bytes(), str(img_path))
        if img is None:  # counted by decode_image; a map-style set cannot drop it: fail loudly
            raise ValueError(f"{img_path}: unreadable image")
        label = prepare_label(read_label(ann_path, str(ann_path)), self.reduce, self.ignore)
        return self.transform(img, label)


class SegShardDataset(ShardDataset):
    """Streaming reader of packed shards; bad samples are skipped and counted by name."""

    def __init__(self, spec, transform, training, reduce_labels=True, ignore_index=255, **kw):
        super().__init__(spec, transform, training, **kw)
        self.reduce, self.ignore = reduce_labels, ignore_index

    def decode(self, sample: dict):
        what = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        img = decode_image(sample.get("jpg") or sample.get("jpeg") or b"", what, 8, self.counter)
        if img is None:
            return None
        try:
            raw = read_label(sample["png"], what)
        except (KeyError, OSError, ValueError) as e:
            self.counter.count("corrupt", f"{what} (label)", e)
            return None
        if raw.shape != (img.height, img.width):
            self.counter.count("corrupt", f"{what}: label {raw.shape[::-1]} != image {img.size}")
            return None
        return self.transform(img, prepare_label(raw, self.reduce, self.ignore))


def segmentation_dataset(spec, split, transform, training, reduce_labels=True, skip_bad=False,
                         ignore_index=255, shuffle_buffer=1000, seed=0):  # fmt: skip
    """Shards (folder of .tar, pattern, URL) or an ADEChallengeData2016 root + split name."""
    if is_shard_spec(spec):
        return SegShardDataset(spec, transform, training, reduce_labels, ignore_index,
                               shuffle_buffer=shuffle_buffer, seed=seed)  # fmt: skip
    return ADE20KFolder(spec, split, transform, reduce_labels, skip_bad, ignore_index)


# ------------------------------------------------------------------------------ packing
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="ADEChallengeData2016 folder (images/, annotations/)")
    p.add_argument("out", help="output folder; shards go to OUT/<split>/")
    p.add_argument("--splits", nargs="+", default=list(SPLITS))
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the training split")
    p.add_argument("--skip-bad", action="store_true", help="skip (and list) bad pairs")


def pack_split(src, out, split, shard_size=1000, seed=0, skip_bad=False) -> int:
    """Write the shards and meta.json of one split; returns the number of samples."""
    import webdataset as wds

    pairs = checked_pairs(src, split, skip_bad)
    if split == "training":
        random.Random(seed).shuffle(pairs)
    dest = Path(out) / split
    dest.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(dest / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as w:
        for img, ann in pairs:
            w.write({"__key__": img.stem, "jpg": img.read_bytes(), "png": ann.read_bytes()})
    meta = {"num_samples": len(pairs), "split": split, "source": os.path.abspath(src),
            "format": "ADEChallengeData2016", "keys": ["jpg", "png"],
            "shard_samples": folder_shard_samples(dest)}  # fmt: skip
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))
    return len(pairs)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``unipred data pack-segmentation``."""
    for split in args.splits:
        try:
            n = pack_split(args.src, args.out, split, args.shard_size, args.seed, args.skip_bad)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}")
            return 1
        print(f"{split}: {n} samples -> {Path(args.out) / split}")
    return 0


# ---------------------------------------------------------------------- generated scenes
class SyntheticScenes(torch.utils.data.Dataset):
    """Generated scenes with known masks, for tests and smoke runs (no download).

    Class 0 is a textured background (random colour gradient, oriented stripes, noise); up
    to three shapes are drawn over it, each with its own texture and a random colour:
    1 = rectangle with horizontal stripes, 2 = disc with a checkerboard, 3 = triangle with
    vertical stripes. Sample i depends on ``seed`` and i only. -> (image (3, S, S)
    normalised to [-1, 1], label (S, S) long).
    """

    num_classes = 4

    def __init__(self, length: int = 256, size: int = 48, seed: int = 0):
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.size
        yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")

        def u(a=0.0, b=1.0, n=()):
            return torch.empty(n).uniform_(a, b, generator=g)

        ang, freq = u(0, 3.1416), u(0.15, 0.5)
        stripes = torch.sin((xx * torch.cos(ang) + yy * torch.sin(ang)) * freq)
        img = u(0.2, 0.6, (3, 1, 1)) + 0.15 * stripes + 0.1 * (yy / s - 0.5) * u(-1, 1, (3, 1, 1))
        img = img + 0.05 * torch.randn(3, s, s, generator=g)
        label = torch.zeros(s, s, dtype=torch.long)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            cls = int(torch.randint(1, 4, (), generator=g))
            r = float(u(0.18, 0.35)) * s
            cy, cx = float(u(r, s - r)), float(u(r, s - r))
            dy, dx = yy - cy, xx - cx
            if cls == 1:
                mask = (dy.abs() < r * 0.8) & (dx.abs() < r)
                tex = (yy // 2 % 2).float()
            elif cls == 2:
                mask = dy**2 + dx**2 < r**2
                tex = ((yy // 3 + xx // 3) % 2).float()
            else:
                mask = (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2)
                tex = (xx // 2 % 2).float()
            colour = u(0.3, 1.0, (3, 1, 1))
            img = torch.where(mask, colour * (0.6 + 0.4 * tex), img)
            label[mask] = cls
        return img.clamp(0, 1) * 2 - 1, label
