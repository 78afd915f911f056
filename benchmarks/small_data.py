"""Small-image data sets and the pixel k-NN baseline of docs/small-data.md.

    python benchmarks/small_data.py digits OUT [--train 500 --val 100 --size 20 --seed 0]
        20x20 grey digits drawn from the DejaVu fonts (random size, slant, shift, stroke
        blur and noise) as OUT/train/<digit>/*.png and OUT/val/<digit>/*.png
    python benchmarks/small_data.py fmnist OUT [--train 500 --val 100 --root DIR]
        a class-balanced Fashion-MNIST subset as PNG folders (same layout)
    python benchmarks/small_data.py knn OUT [--labels-per-class 20 --subset-seed 0]
        1-nearest-neighbour on raw pixels, training subset chosen exactly as
        ``data.labels_per_class`` / ``data.subset_seed`` choose it (unipred.task)

Only PIL, numpy and torch are needed (all in the lock).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = "/usr/share/fonts/truetype/dejavu"


def _fonts() -> list[str]:
    fonts = sorted(glob.glob(os.path.join(FONT_DIR, "DejaVu*.ttf")))
    fonts = [f for f in fonts if "MathTeX" not in f]
    if not fonts:
        sys.exit(f"no DejaVu fonts in {FONT_DIR} (apt-get install fonts-dejavu-core)")
    return fonts


def draw_digit(d: int, rng: np.random.Generator, fonts: list[str], size: int) -> Image.Image:
    """One grey digit: font, size, rotation, shift, blur and noise drawn from ``rng``."""
    big = size * 4
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(big * rng.uniform(0.55, 0.85)))
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), str(d), font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    x = (big - w) / 2 - box[0] + rng.uniform(-0.12, 0.12) * big
    y = (big - h) / 2 - box[1] + rng.uniform(-0.12, 0.12) * big
    draw.text((x, y), str(d), fill=255, font=font)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.0)))
    img = img.resize((size, size), Image.LANCZOS)
    a = np.asarray(img).astype(np.float32) * rng.uniform(0.6, 1.0)
    a += rng.normal(0, rng.uniform(0, 20), a.shape) + rng.uniform(0, 40)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), mode="L")


def make_digits(out: str, n_train: int, n_val: int, size: int, seed: int) -> None:
    fonts = _fonts()
    for split, n, off in (("train", n_train, 0), ("val", n_val, 1)):
        for d in range(10):
            folder = os.path.join(out, split, str(d))
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, off, d, i])
                draw_digit(d, rng, fonts, size).save(os.path.join(folder, f"{i:05d}.png"))
    print(f"{out}: {10 * n_train} training and {10 * n_val} validation digits, {size}x{size}")


def make_fmnist(out: str, n_train: int, n_val: int, root: str, seed: int) -> None:
    from unipred.tasks.image.fmnist_data import CLASSES, read_split

    for split, src, n in (("train", "train", n_train), ("val", "test", n_val)):
        x, y = read_split(root, src)
        rng = np.random.default_rng(seed)
        for c in range(len(CLASSES)):
            idx = np.flatnonzero(y.numpy() == c)
            idx = np.sort(rng.permutation(idx)[:n])
            folder = os.path.join(out, split, f"{c}_{CLASSES[c].replace('/', '_')}")
            os.makedirs(folder, exist_ok=True)
            for i in idx:
                Image.fromarray(x[i].numpy(), mode="L").save(os.path.join(folder, f"{i:05d}.png"))
    print(f"{out}: {10 * n_train} training and {10 * n_val} validation images, 28x28")


def _load(folder: str):
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, name))):
            img = Image.open(os.path.join(folder, name, f)).convert("L")
            xs.append(np.asarray(img, dtype=np.float32).ravel() / 255)
            ys.append(c)
    return np.stack(xs), np.array(ys)


def knn(out: str, k: int, subset_seed: int) -> float:
    """1-NN (Euclidean, raw pixels) accuracy on OUT/val with k labels per class of OUT/train."""
    from unipred.task import per_class_indices

    xt, yt = _load(os.path.join(out, "train"))
    xv, yv = _load(os.path.join(out, "val"))
    if k > 0:
        idx = per_class_indices(yt.tolist(), k, subset_seed)
        xt, yt = xt[idx], yt[idx]
    d = (xv**2).sum(1)[:, None] - 2 * xv @ xt.T + (xt**2).sum(1)[None]
    acc = float((yt[d.argmin(1)] == yv).mean())
    print(f"pixel 1-NN, {k or 'all'} labels per class ({len(yt)} images): {100 * acc:.1f} %")
    return acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("digits")
    a.add_argument("out")
    a.add_argument("--train", type=int, default=500, help="training images per class")
    a.add_argument("--val", type=int, default=100, help="validation images per class")
    a.add_argument("--size", type=int, default=20)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("fmnist")
    b.add_argument("out")
    b.add_argument("--train", type=int, default=500)
    b.add_argument("--val", type=int, default=100)
    b.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("knn")
    c.add_argument("out")
    c.add_argument("--labels-per-class", type=int, default=0)
    c.add_argument("--subset-seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "digits":
        make_digits(args.out, args.train, args.val, args.size, args.seed)
    elif args.cmd == "fmnist":
        make_fmnist(args.out, args.train, args.val, args.root, args.seed)
    else:
        knn(args.out, args.labels_per_class, args.subset_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
