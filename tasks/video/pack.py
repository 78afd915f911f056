"""Pack a video folder or CSV list into shuffled webdataset shards (original bytes kept).

    unipred data pack-video SRC OUT [--shard-size 200] [--seed 0] [--no-check]

SRC is any layout ``unipred.tasks.video.data.list_videos`` reads: class sub-folders of video files
or of frame folders, a CSV ``path,label`` file, or loose files (unlabelled). Video files are
stored byte for byte under their extension; a frame folder's images become ``f00000.jpg``,
``f00001.jpg``, ... of one sample. OUT gets ``shard-000000.tar``, ... and ``meta.json``
(class names, sample count, skipped files, the shard pattern to put in a config).
Unless ``--no-check``, every video's header is opened with torchcodec first and files that
cannot be opened are skipped and counted rather than packed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from unipred.tasks.video.data import FRAME_EXTS, list_videos

from unipred.data.shards import folder_shard_samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="video folder (class sub-folders) or CSV path,label file")
    parser.add_argument("out", help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=200, help="clips per shard")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (-1: keep order)")
    parser.add_argument("--no-check", action="store_true", help="pack without opening videos")


def _check(path: Path) -> None:
    """Raise if torchcodec cannot open the file or finds no frames in it."""
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(str(path), seek_mode="approximate")
    if not (dec.metadata.num_frames or dec.metadata.duration_seconds):
        raise ValueError("no frames")


def _sample(path: Path, label: int, key: str) -> dict:
    sample = {"__key__": key, "cls": str(label).encode()}
    if path.is_dir():
        frames = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_EXTS)
        for i, f in enumerate(frames):
            ext = "jpg" if f.suffix.lower() in (".jpg", ".jpeg") else "png"
            sample[f"f{i:05d}.{ext}"] = f.read_bytes()
    else:
        sample[path.suffix.lower().lstrip(".")] = path.read_bytes()
    return sample


def pack_videos(src, out, shard_size: int = 200, seed: int = 0, check: bool = True) -> dict:
    """Write shards from ``src`` into ``out``; returns the metadata written to meta.json."""
    import webdataset as wds

    samples, classes = list_videos(src)
    if seed >= 0:
        random.Random(seed).shuffle(samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    n = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for path, label in samples:
            try:
                if check and not path.is_dir():
                    _check(path)
                sample = _sample(path, label, f"{n:08d}")
            except Exception as err:  # unreadable file: skip and report, never abort the pack
                skipped.append(f"{path}: {type(err).__name__}: {err}")
                continue
            sink.write(sample)
            n += 1
    n_shards = len(list(out.glob("shard-*.tar")))
    meta = {
        "classes": classes,
        "num_samples": n,
        "num_shards": n_shards,
        "pattern": str(out / f"shard-{{000000..{max(n_shards - 1, 0):06d}}}.tar"),
        "skipped": skipped,
        "shard_samples": folder_shard_samples(out),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def run(args: argparse.Namespace) -> int:
    """CLI entry: pack, print a summary; exit code 1 if nothing could be packed."""
    meta = pack_videos(args.src, args.out, args.shard_size, args.seed, not args.no_check)
    print(
        f"packed {meta['num_samples']} clips into {meta['num_shards']} shard(s) "
        f"({len(meta['classes'])} classes); skipped {len(meta['skipped'])} unreadable file(s)"
    )
    for line in meta["skipped"][:20]:
        print(f"  skipped {line}")
    print(f"data.root={meta['pattern']}")
    return 0 if meta["num_samples"] else 1
