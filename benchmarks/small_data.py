"""Small-image data sets and the pixel k-NN baseline of docs/small-data.md.

    python benchmarks/small_data.py digits OUT [--train 500 --val 100 --size 20 --seed 0]
        20x20 grey digits drawn from the DejaVu fonts (random size, slant, shift, stroke
        blur and noise) as OUT/train/<digit>/*.png and OUT/val/<digit>/*.png
    python benchmarks/small_data.py fmnist OUT [--train 500 --val 100 --root DIR]
        a class-balanced Fashion-MNIST subset as PNG folders (same layout)
    python benchmarks/small_data.py knn DATA [--labels-per-class 20 --subset-seed 0]
        1-nearest-neighbour on raw pixels of DATA (the folder ``digits``/``fmnist`` wrote:
        DATA/train, DATA/val); the training subset is the one ``data.labels_per_class`` /
        ``data.subset_seed`` pick for a run (unipred.task.classify.per_class_indices: for
        every class, ``k`` images drawn by ``subset_seed`` alone, so a fine-tune, a probe and
        this baseline with the same budget and seed see the same labelled images)
    python benchmarks/small_data.py compare DATA RUNS [--labels 10,20 --seeds 0,1,2
                                    --pretrain CKPT --jobs 2 --set KEY=VALUE ...]
        the small-image recipe end to end with ``unipred fit``: one NEPA pretraining on
        DATA/train with small/pretrain (--pretrain-config small/pretrain_patch: the next-patch
        variant; skipped with --pretrain), then for every label budget and seed a NEPA and
        a scratch fine-tune (small/finetune) and a NEPA and a random-init linear probe
        (small/probe), plus pixel 1-NN; prints one row per budget (mean, and min-max over
        the seeds) and writes RUNS/results.json. --set adds an override to every run (e.g.
        data.aug.img_size=20), --set-pretrain / --set-finetune to one stage only.

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


def last_val_acc(run: str) -> float | None:
    """``val/acc1`` of the last validation in RUN/logs/version_0/metrics.csv (None if absent)."""
    import csv

    path = os.path.join(run, "logs", "version_0", "metrics.csv")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        vals = [r["val/acc1"] for r in csv.DictReader(f) if r.get("val/acc1")]
    return float(vals[-1]) if vals else None


def _fit(config: str, args: list[str], run: str) -> tuple[list[str], str]:
    cmd = [sys.executable, "-m", "unipred.cli", "fit", config, *args, f"run_dir={run}",
           "trainer.progress_bar=false"]  # fmt: skip
    return cmd, run


def compare(a) -> dict:
    """Pretrain once, then fine-tune / probe every (budget, seed), in ``a.jobs`` processes."""
    import json
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor

    data = [f"data.root={a.data}/train", f"data.val_root={a.data}/val", *a.set]
    os.makedirs(a.runs, exist_ok=True)

    def run(job):
        cmd, folder = job
        if last_val_acc(folder) is not None or os.path.isfile(f"{folder}.done"):
            return folder, 0.0  # done before: reuse (delete the folder to rerun)
        t0 = time.time()
        with open(f"{folder}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            sys.exit(f"{' '.join(cmd)}: exit {rc}; see {folder}.log")
        open(f"{folder}.done", "w").close()
        return folder, time.time() - t0

    ckpt = a.pretrain
    timing = {}
    if not ckpt:
        folder = os.path.join(a.runs, "pretrain")
        _, timing["pretrain"] = run(_fit(a.pretrain_config, data + a.set_pretrain, folder))
        ckpt = os.path.join(folder, "checkpoints", "last.ckpt")
    init = f"model.init=pretrain:{ckpt}"
    jobs = []
    for seed in a.seeds:  # every budget of a seed first: a cut-short run has whole rows
        for k in a.labels:
            common = [*data, f"data.labels_per_class={k}", f"seed={seed}"]
            for name, config, extra in (
                ("ft_nepa", "small/finetune", [init, *a.set_finetune]),
                ("ft_scratch", "small/finetune", list(a.set_finetune)),
                ("probe_nepa", "small/probe", [init]),
                ("probe_random", "small/probe", []),
            ):
                folder = os.path.join(a.runs, f"{name}_{k}_s{seed}")
                jobs.append(_fit(config, common + extra, folder))
    with ThreadPoolExecutor(a.jobs) as pool:
        for folder, sec in pool.map(run, jobs):
            timing[os.path.basename(folder)] = round(sec, 1)
            print(f"{os.path.basename(folder)}: {last_val_acc(folder)} ({sec:.0f} s)", flush=True)
    rows = {}
    for k in a.labels:
        row = {"pixel_1nn": knn(a.data, k, 0)}
        for name in ("ft_nepa", "ft_scratch", "probe_nepa", "probe_random"):
            accs = [last_val_acc(os.path.join(a.runs, f"{name}_{k}_s{s}")) for s in a.seeds]
            row[name] = accs
        rows[k] = row
    print("\n| labels per class | NEPA fine-tune | scratch fine-tune | NEPA probe | "
          "random-init probe | pixel 1-NN |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for k, row in rows.items():
        cells = []
        for name in ("ft_nepa", "ft_scratch", "probe_nepa", "probe_random"):
            v = [100 * x for x in row[name]]
            spread = f" ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else ""
            cells.append(f"{sum(v) / len(v):.1f} %{spread}")
        print(f"| {k} | {' | '.join(cells)} | {100 * row['pixel_1nn']:.1f} % |")
    out = {"data": a.data, "pretrain": ckpt, "pretrain_config": a.pretrain_config, "seeds": a.seeds, "set": a.set,
           "set_pretrain": a.set_pretrain, "set_finetune": a.set_finetune,
           "rows": rows, "seconds": timing}  # fmt: skip
    with open(os.path.join(a.runs, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


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
    c = sub.add_parser("knn", help="pixel 1-NN on a data folder (the raw-input baseline)")
    c.add_argument(
        "out", metavar="data", help="the folder made by `digits`/`fmnist` (train/, val/)"
    )
    c.add_argument("--labels-per-class", type=int, default=0,
                   help="training images per class (0 = all): the same subset a run with "
                   "data.labels_per_class and data.subset_seed trains on")  # fmt: skip
    c.add_argument("--subset-seed", type=int, default=0, help="picks the subset (data.subset_seed)")
    e = sub.add_parser("compare")
    e.add_argument("data", help="DATA/train and DATA/val, class sub-folders")
    e.add_argument("runs", help="run folders go here (a finished run is reused)")
    e.add_argument("--labels", type=_ints, default=[10, 20], help="budgets, e.g. 10,20")
    e.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="fine-tuning/probe seeds")
    e.add_argument("--pretrain", default="", help="use this pretraining checkpoint")
    e.add_argument(
        "--pretrain-config",
        default="small/pretrain",
        help="the pretraining recipe when --pretrain is not given (small/pretrain_patch: pixels)",
    )
    e.add_argument("--jobs", type=int, default=1, help="runs at a time")
    e.add_argument("--set", action="append", default=[], help="override for every run")
    e.add_argument("--set-pretrain", action="append", default=[])
    e.add_argument("--set-finetune", action="append", default=[])
    args = p.parse_args(argv)
    if args.cmd == "digits":
        make_digits(args.out, args.train, args.val, args.size, args.seed)
    elif args.cmd == "fmnist":
        make_fmnist(args.out, args.train, args.val, args.root, args.seed)
    elif args.cmd == "knn":
        knn(args.out, args.labels_per_class, args.subset_seed)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
