"""Video input-pipeline speed: decoded + augmented clips/s per DataLoader worker.

    python benchmarks/video_loader.py                       # synthetic Kinetics-like mp4 clips
    python benchmarks/video_loader.py --root /data/k400/train --workers 8
    python benchmarks/video_loader.py --layout frames       # pre-extracted JPEG frame folders

Reads clips with unipred's training reader (``unipred.tasks.video.data.VideoFolder``: torchcodec
decoding of only the sampled frames, or JPEG frame folders) and the training transform
(short side to 256, random 224 crop, flip, normalise), with Kinetics' sampling by default
(16 frames, stride 4). Without ``--root`` it first writes ``--clips`` synthetic clips of
``--seconds`` at ``--fps`` and ``--height`` x ``--width`` (h264 mp4, or JPEG frames), with
moving textured content so the encoder cannot shrink them to nothing. Reports clips/s and
frames/s overall and per worker, timed after ``--warmup`` batches plus the ones the workers
prefetched meanwhile; one torch thread per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from unipred.tasks.video.data import ClipTransform, VideoFolder, encode_frames_jpeg, write_video


def synthetic_clip(frames: int, h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 (T, 3, H, W): a smooth colour texture drifting across the frame, plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        torch.rand(1, 3, h // 16 + 2, w // 16 + 2, generator=g), size=(h + 64, w + 64),
        mode="bicubic", align_corners=False,
    )[0]  # fmt: skip
    dy, dx = (torch.rand(2, generator=g) * 2 - 1).tolist()
    out = torch.empty(frames, 3, h, w, dtype=torch.uint8)
    for t in range(frames):
        oy, ox = int(32 + dy * 30 * t / frames), int(32 + dx * 30 * t / frames)
        f = base[:, oy : oy + h, ox : ox + w] + 0.03 * torch.randn(3, h, w, generator=g)
        out[t] = (f.clamp(0, 1) * 255).to(torch.uint8)
    return out


def make_clips(root: Path, args) -> Path:
    """Write ``args.clips`` clips into 4 class folders; returns the root."""
    n_frames = int(args.seconds * args.fps)
    for i in range(args.clips):
        clip = synthetic_clip(n_frames, args.height, args.width, seed=i)
        d = root / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        if args.layout == "frames":
            fd = d / f"clip{i}"
            fd.mkdir()
            for t, data in enumerate(encode_frames_jpeg(clip, quality=90)):
                (fd / f"{t + 1:05d}.jpg").write_bytes(data)
        else:
            write_video(d / f"clip{i}.mp4", clip, fps=args.fps, crf=23, preset="ultrafast")
    return root


def run(root: str, args) -> dict:
    tf = ClipTransform(args.size, train=True, scale=args.scale, hflip=True)
    ds = VideoFolder(root, args.num_frames, args.stride, tf)
    # one long epoch drawn with replacement: no epoch boundary (worker restart, drained
    # prefetch) inside the timed batches, however few clips there are
    warmup = args.warmup + 2 * args.workers  # what the workers prefetch is not their rate
    sampler = torch.utils.data.RandomSampler(ds, replacement=True,
                                             num_samples=(warmup + args.batches) * args.batch)  # fmt: skip
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=sampler,
                                         num_workers=args.workers)  # fmt: skip
    clips, t0 = 0, None
    for done, (x, _) in enumerate(loader, 1):
        assert x.shape[1:] == (3, args.num_frames, args.size, args.size), x.shape
        if done == warmup:
            t0 = time.perf_counter()
        elif done > warmup:
            clips += x.shape[0]
    dt = time.perf_counter() - t0
    per_s = clips / dt
    return {"layout": args.layout, "workers": args.workers, "batch": args.batch,
            "num_frames": args.num_frames, "stride": args.stride, "size": args.size,
            "clips": clips, "seconds": round(dt, 2), "clips_per_s": round(per_s, 2),
            "clips_per_s_per_worker": round(per_s / max(args.workers, 1), 2),
            "frames_per_s": round(per_s * args.num_frames, 1),
            "load_average": round(os.getloadavg()[0], 1), "cores": os.cpu_count()}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="", help="class folders of clips (default: synthetic)")
    p.add_argument("--layout", choices=["mp4", "frames"], default="mp4", help="synthetic data")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=340)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--scale", type=float, default=1.14)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", type=int, default=12, help="timed batches")
    p.add_argument("--dry-run", action="store_true", help="tiny clips and batches (CI)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.clips, args.seconds, args.fps, args.height, args.width = 4, 1.0, 8, 48, 64
        args.num_frames, args.stride, args.size, args.batch, args.batches = 4, 2, 32, 2, 2
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or str(make_clips(Path(tmp) / "clips", args))
        print(json.dumps(run(root, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
