"""Pack an audio folder or CSV list into shuffled webdataset shards (mono FLAC at one rate).

    unipred data pack-audio SRC OUT [--csv F --path-column C --label-column C --where COL=V,..]
                                    [--include-list F] [--exclude-list F ...] [--classes F]
                                    [--sample-rate 16000] [--keep-original] [--workers N]

SRC is any layout ``unipred.tasks.audio.data.list_audio`` reads: class sub-folders (Speech Commands),
a folder plus ``--csv`` (ESC-50: ``--csv meta/esc50.csv --path-column filename
--label-column category --where fold=1,2,3,4``), or loose files (unlabelled, e.g. AudioSet
for pretraining). ``--include-list`` / ``--exclude-list`` name files relative to SRC, one per
line (Speech Commands' ``validation_list.txt`` and ``testing_list.txt``).

Every clip is decoded once: unreadable files are skipped and counted, never packed. By default
clips are stored downmixed and resampled to ``--sample-rate`` as lossless FLAC (smaller, and
the reader never resamples); ``--keep-original`` stores the original bytes instead. OUT gets
``shard-000000.tar``, ..., ``meta.json`` (classes, counts, skipped files, the shard pattern,
and the log-mel mean/std to put in ``model.tokenizer_args``) and ``classes.txt``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
from pathlib import Path

from unipred.tasks.audio.data import decode_audio, list_audio, logmel_stats

from unipred.data.shards import folder_shard_samples


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pack-audio`` options."""
    p.add_argument("src", help="audio folder (class sub-folders, loose files, or with --csv)")
    p.add_argument("out", help="output folder for the shards (one split per folder)")
    p.add_argument("--csv", default="", help="CSV naming clips (relative to SRC) and labels")
    p.add_argument("--path-column", default="path")
    p.add_argument("--label-column", default="label")
    p.add_argument("--where", default="", help="keep CSV rows matching COLUMN=V1,V2")
    p.add_argument("--classes", default="", help="classes.txt fixing the label order")
    p.add_argument("--include-list", default="", help="pack only the files listed (rel. to SRC)")
    p.add_argument("--exclude-list", action="append", default=[], help="leave these files out")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--keep-original", action="store_true", help="store the original bytes")
    p.add_argument("--shard-size", type=int, default=1000, help="clips per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (-1: keep order)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--stats-clips", type=int, default=500, help="clips for log-mel mean/std")
    p.add_argument("--limit", type=int, default=0, help="pack only the first N (after shuffling)")


def _read_list(path: str) -> set[str]:
    return {ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()}


def select_items(args) -> tuple[list, list[str]]:
    """The (path, label) items and class names that the options describe."""
    classes = Path(args.classes).read_text().split() if args.classes else None
    items, names = list_audio(args.src, args.csv, args.path_column, args.label_column,
                              args.where, classes)  # fmt: skip
    src = Path(args.src)

    def rel(p: Path) -> str:
        return p.relative_to(src).as_posix() if p.is_relative_to(src) else str(p)

    if args.include_list:
        keep = _read_list(args.include_list)
        items = [it for it in items if rel(it[0]) in keep]
    for ex in args.exclude_list:
        drop = _read_list(ex)
        items = [it for it in items if rel(it[0]) not in drop]
    if args.seed >= 0:
        random.Random(args.seed).shuffle(items)
    return (items[: args.limit] if args.limit else items), names


def _encode(job):
    """(path, label, sample_rate, keep) -> (path, label, ext, bytes, seconds) or (path, error)."""
    path, label, sr, keep = job
    try:
        wave = decode_audio(str(path), sr)  # also the corruption check for --keep-original
        if keep:
            return (
                path,
                label,
                path.suffix.lower().lstrip("."),
                path.read_bytes(),
                wave.numel() / sr,
            )
        from torchcodec.encoders import AudioEncoder

        flac = AudioEncoder(wave[None], sample_rate=sr).to_tensor("flac")
        return path, label, "flac", flac.numpy().tobytes(), wave.numel() / sr
    except Exception as err:  # unreadable file: skip and report, never abort the pack
        return path, f"{type(err).__name__}: {err}"


def pack_audio(args) -> dict:
    """Write the shards described by ``args`` (see ``add_arguments``); returns meta.json's dict."""
    import webdataset as wds

    items, classes = select_items(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, lab, args.sample_rate, args.keep_original) for p, lab in items]
    skipped, n, seconds = [], 0, 0.0
    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    results = pool.imap(_encode, jobs, chunksize=8) if pool else map(_encode, jobs)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=args.shard_size, verbose=0) as sink:
        for res in results:
            if len(res) == 2:
                skipped.append(f"{res[0]}: {res[1]}")
                continue
            path, label, ext, data, secs = res
            meta = {"source": str(path), "label": label, "seconds": round(secs, 3)}
            sink.write({"__key__": f"{n:09d}", ext: data, "cls": str(label).encode(),
                        "json": json.dumps(meta).encode()})  # fmt: skip
            n, seconds = n + 1, seconds + secs
    if pool:
        pool.close()
    n_shards = len(list(out.glob("shard-*.tar")))
    meta = {"classes": classes, "num_samples": n, "num_shards": n_shards, "hours": seconds / 3600,
            "sample_rate": args.sample_rate,
            "pattern": str(out / f"shard-{{000000..{max(n_shards - 1, 0):06d}}}.tar"),
            "skipped": skipped, "shard_samples": folder_shard_samples(out)}  # fmt: skip
    if n and args.stats_clips > 0:
        mean, std = _stats(out, args)
        meta["logmel_mean"], meta["logmel_std"] = round(mean, 4), round(std, 4)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return meta


def _stats(out: Path, args) -> tuple[float, float]:
    """Log-mel mean/std of the default "audio" tokenizer over the first packed clips."""
    from unipred.tasks.audio.data import AudioShardDataset, ClipTransform

    ds = AudioShardDataset(str(out), ClipTransform(args.sample_rate, 0.0, 0.0), shuffle_buffer=0)
    clips = []
    for wave, _ in ds:
        clips.append((wave, 0))
        if len(clips) >= args.stats_clips:
            break
    return logmel_stats(clips, {"sample_rate": args.sample_rate}, args.stats_clips)


def run(args: argparse.Namespace) -> int:
    """CLI entry: pack, print a summary; exit code 1 if nothing could be packed."""
    meta = pack_audio(args)
    print(
        f"packed {meta['num_samples']} clips ({meta['hours']:.2f} h) into {meta['num_shards']} "
        f"shard(s) ({len(meta['classes'])} classes); skipped {len(meta['skipped'])} unreadable"
    )
    for line in meta["skipped"][:20]:
        print(f"  skipped {line}")
    print(f"data.root={meta['pattern']}")
    if "logmel_mean" in meta:
        print(f"model.tokenizer_args.mean={meta['logmel_mean']} "
              f"model.tokenizer_args.std={meta['logmel_std']}")  # fmt: skip
    return 0 if meta["num_samples"] else 1
