"""Input-pipeline speed: decoded + augmented images/s per DataLoader worker from shards.

    python benchmarks/data_loader.py                          # synthetic JPEG shards, pretrain aug
    python benchmarks/data_loader.py --shards /d/train --pipeline finetune --workers 4

Reads webdataset shards with unipred's ShardDataset (the training reader: tar streaming,
shuffle buffer, JPEG decode with bad-sample accounting, augmentation, collation into
224 px batches). Without ``--shards`` it first writes ``--images`` synthetic JPEGs of an
ImageNet-like size (about 500x375, quality 90) and packs them with ``pack-images``.
Reports images/s overall and per worker, after ``--warmup`` batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from unipred.data.images import ShardDataset
from unipred.data.transforms import ImageAugConfig, eval_transform, train_transform

PIPELINES = {
    "pretrain": ImageAugConfig(),
    "finetune": ImageAugConfig(
        interpolation="bicubic", auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25
    ),
    "eval": ImageAugConfig(),
}


def synthetic_photo(rng, h=375, w=500) -> Image.Image:
    """Smooth colour fields plus edges and mild noise: JPEG sizes close to ImageNet's."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for _ in range(6):
        f, ph = rng.uniform(1, 12, 2), rng.uniform(0, 6.28, 3)
        img += rng.uniform(10, 40, 3) * np.sin(
            f[0] * 6.28 * yy[..., None] + f[1] * 6.28 * xx[..., None] + ph
        )
    img += rng.uniform(60, 190, 3)
    for _ in range(4):  # a few hard-edged blobs
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
        img[(yy * max(h, w) - cy) ** 2 + (xx * max(h, w) - cx) ** 2 < r * r] = rng.uniform(
            0, 255, 3
        )
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_shards(root: str, n: int, seed: int = 0) -> str:
    """Write n synthetic JPEGs in 10 class folders and pack them; returns the shard folder."""
    import argparse as ap

    from unipred.data.pack import add_arguments, pack

    rng = np.random.default_rng(seed)
    src = os.path.join(root, "src")
    for i in range(n):
        d = os.path.join(src, f"c{i % 10}")
        os.makedirs(d, exist_ok=True)
        synthetic_photo(rng).save(os.path.join(d, f"{i}.jpg"), quality=90)
    p = ap.ArgumentParser()
    add_arguments(p)
    out = os.path.join(root, "shards")
    pack(p.parse_args([src, out, "--workers", "1", "--max-per-shard", "64"]))
    return out


def run(spec: str, pipeline: str, workers: int, batch: int, warmup: int, batches: int) -> dict:
    """Time ``batches`` batches after ``warmup`` ones; -> images/s overall and per worker."""
    cfg = PIPELINES[pipeline]
    tf = eval_transform(cfg) if pipeline == "eval" else train_transform(cfg)
    ds = ShardDataset(spec, tf, training=pipeline != "eval", shuffle_buffer=1000)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    done, n_img, t0 = 0, 0, None
    while done < warmup + batches:
        for x, _ in loader:
            assert x.shape[-2:] == (cfg.img_size, cfg.img_size)
            done += 1
            if done == warmup:
                t0 = time.perf_counter()
            elif done > warmup:
                n_img += x.shape[0]
            if done >= warmup + batches:
                break
    dt = time.perf_counter() - t0
    return {
        "images": n_img,
        "seconds": dt,
        "images_per_s": n_img / dt,
        "per_worker": n_img / dt / max(workers, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="", help="shard spec (default: make synthetic shards)")
    p.add_argument("--images", type=int, default=512, help="synthetic images to make")
    p.add_argument("--pipeline", choices=sorted(PIPELINES), default="pretrain")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards or make_shards(tmp, args.images)
        if not args.shards:
            sizes = [
                os.path.getsize(os.path.join(r, f))
                for r, _, fs in os.walk(os.path.join(tmp, "src"))
                for f in fs
            ]
            print(f"synthetic JPEGs: {len(sizes)}, 500x375, mean {np.mean(sizes) / 1e3:.0f} kB")
        r = run(spec, args.pipeline, args.workers, args.batch, args.warmup, args.batches)
    print(
        f"pipeline={args.pipeline} workers={args.workers} batch={args.batch}: "
        f"{r['images_per_s']:.1f} images/s, {r['per_worker']:.1f} images/s per worker "
        f"({r['images']} images in {r['seconds']:.1f} s; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
