"""Input-pipeline speed: decoded + augmented images/s per DataLoader worker from shards.

    python benchmarks/data_loader.py                          # synthetic JPEG shards, pretrain aug
    python benchmarks/data_loader.py --shards /d/train --pipeline finetune --workers 4
    python benchmarks/data_loader.py --train --workers 14 --batch 256 --images 4096   # on a GPU

Reads webdataset shards with unipred's ShardDataset (the training reader: tar streaming,
shuffle buffer, JPEG decode with bad-sample accounting, augmentation, collation into
224 px batches). Without ``--shards`` it first writes ``--images`` synthetic JPEGs of an
ImageNet-like size (about 500x375, quality 90) and packs them with ``pack-images``.
Reports images/s overall and per worker, after ``--warmup`` batches.

``--train`` answers "does the loader keep up with the training step?": it runs the same
pretraining step (``--model``, default ViT-B/14; bf16 autocast, fused AdamW, clipping and
``torch.compile`` on CUDA) twice, fed once by one batch kept on the device and once by the
loader (pinned memory, non-blocking copies; after the batches the workers prefetched while
the device-fed steps ran are used up, so the timed steps see the loader's steady rate), and
reports both step rates and the share of the loader-fed wall time spent waiting for data.
``--decode-on-device`` measures the same with ``data.decode_on_device``'s pipeline (workers
pass JPEG bytes and crop draws; nvJPEG decodes, crops and resizes on the GPU). ``--dry-run`` runs it tiny on a CPU.
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
from unipred.tasks.image.data import ShardDataset
from unipred.tasks.image.device_decode import DeviceDecodeTransform
from unipred.tasks.image.transforms import ImageAugConfig, eval_transform, train_transform

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

    from unipred.tasks.image.pack import add_arguments, pack

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


def train_against_loader(spec: str, args) -> dict:
    """Steps/s of one training step fed from the device vs from the shard loader."""
    from unipred.nn.model import NEPA

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = PIPELINES["pretrain"] if not args.dry_run else ImageAugConfig(img_size=32)
    # one endless epoch (the reader re-reads its shards to fill num_samples), so no epoch
    # boundary drains the workers' prefetch inside the timed steps
    on_device = args.decode_on_device
    tf = DeviceDecodeTransform.from_aug(cfg) if on_device else train_transform(cfg)
    ds = ShardDataset(spec, tf, training=True, shuffle_buffer=1000, num_samples=10**9)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=args.workers,
                                         pin_memory=cuda and not on_device, drop_last=True,
                                         collate_fn=tf.collate if on_device else None)  # fmt: skip
    model = NEPA.from_name(args.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    fwd = torch.compile(model) if (cuda and not args.no_compile) else model

    def step(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = fwd(x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    it = iter(loader)
    x0 = next(it)[0].to(dev)
    for _ in range(args.warmup):  # compile, allocator, worker start-up
        step(x0)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        step(x0)
    sync()
    device_s = (time.perf_counter() - t0) / args.batches
    for _ in range(2 * max(1, args.workers)):  # use up what the workers prefetched meanwhile
        step(next(it)[0].to(dev, non_blocking=True))
    sync()
    waited, t0 = 0.0, time.perf_counter()
    for _ in range(args.batches):
        w0 = time.perf_counter()
        x = next(it)[0]
        waited += time.perf_counter() - w0
        step(x.to(dev, non_blocking=True))
    sync()
    loader_s = (time.perf_counter() - t0) / args.batches
    return {"model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "decode": "device" if on_device else "cpu workers",
            "batch": args.batch, "workers": args.workers,
            "step_s_device_batch": device_s, "step_s_loader": loader_s,
            "images_per_s_device_batch": args.batch / device_s,
            "images_per_s_loader": args.batch / loader_s,
            "data_wait_share": waited / (loader_s * args.batches),
            "keeps_up": loader_s <= 1.05 * device_s}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="", help="shard spec (default: make synthetic shards)")
    p.add_argument("--images", type=int, default=512, help="synthetic images to make")
    p.add_argument("--pipeline", choices=sorted(PIPELINES), default="pretrain")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--train", action="store_true", help="feed a training step (see above)")
    p.add_argument("--model", default="nepa_vit_b14", help="--train: the model size")
    p.add_argument("--no-compile", action="store_true", help="--train: eager on CUDA too")
    p.add_argument("--decode-on-device", action="store_true",
                   help="--train: workers pass JPEG bytes, the batch decodes on the device "
                   "(data.decode_on_device)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="--train on any CPU: tiny model at 32 px, 64 images, batch 8, 3 steps")  # fmt: skip
    args = p.parse_args(argv)
    if args.dry_run:
        args.train, args.model, args.images, args.batch = True, "nepa_debug", 64, 8
        args.warmup, args.batches = 1, 3
    if not args.train:
        torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards or make_shards(tmp, args.images)
        if args.train:
            import json

            print(json.dumps(train_against_loader(spec, args)))
            return 0
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
