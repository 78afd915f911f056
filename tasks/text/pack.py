"""Pack text records (a class folder, JSONL or CSV) into shuffled webdataset shards.

    unipred data pack-text SRC OUT [--shard-size 10000] [--unit line] [--window 4096] [--max-record-bytes N]

SRC is any layout the ``text`` data source reads (``unipred.tasks.text.data.read_records``).
Each record becomes one sample: ``txt`` (its UTF-8 bytes) or ``ids.json`` (an id list) and
``cls`` (its label, absent when unlabelled); a record longer than ``--window`` ids is cut into
consecutive windows of that length, each a sample (the reader then takes a ``data.context``
window of each). Bad lines and files are skipped and counted as the readers count them. OUT
gets ``shard-000000.tar``, ... and ``meta.json`` (classes, sample count, skip counts, the
pattern to put in ``data.root``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from unipred.data.accounting import BadSampleCounter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="class folder of text files, or a .jsonl / .csv file")
    parser.add_argument("out", help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    parser.add_argument("--unit", default="line", choices=("line", "file"),
                        help="folders: a record per line or per file")  # fmt: skip
    parser.add_argument("--window", type=int, default=4096, help="max ids per sample")
    parser.add_argument("--max-record-bytes", type=int, default=1 << 20,
                        help="longer lines / files are skipped and counted")  # fmt: skip
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--label-key", default="label")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (-1: keep order)")


def pack_text(src, out, shard_size: int = 10000, unit: str = "line", window: int = 4096,
              seed: int = 0, text_key: str = "text", label_key: str = "label",
              max_record_bytes: int = 1 << 20) -> dict:  # fmt: skip
    """Write shards of the records of ``src`` into ``out``; returns the meta.json content."""
    import webdataset as wds
    from unipred.tasks.text.data import read_records

    if window < 1 or shard_size < 1:
        raise ValueError(f"--window {window} and --shard-size {shard_size} must be >= 1")
    counter = BadSampleCounter()
    records, classes = read_records(str(src), unit, text_key, label_key,
                                    max_bytes=max_record_bytes, counter=counter)  # fmt: skip
    samples = [(x[s : s + window], y) for x, y in records for s in range(0, len(x), window)]
    if seed >= 0:
        random.Random(seed).shuffle(samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for n, (x, y) in enumerate(samples):
            s = {"__key__": f"{n:09d}"}
            if isinstance(x, bytes):
                s["txt"] = x
            else:
                s["ids.json"] = json.dumps(list(x)).encode()
            if y >= 0:
                s["cls"] = str(y).encode()
            sink.write(s)
    n_shards = len(list(out.glob("shard-*.tar")))
    skipped = {k: v for k, v in counter.snapshot().items() if v and k.startswith("skipped/")}
    meta = {
        "classes": classes,
        "num_samples": len(samples),
        "num_shards": n_shards,
        "pattern": str(out / f"shard-{{000000..{max(n_shards - 1, 0):06d}}}.tar"),
        "skipped": skipped,
        "bad_files": counter.bad_files(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def run(args: argparse.Namespace) -> int:
    """CLI entry: pack and print a summary; exit 2 when SRC cannot be read, 1 when empty."""
    try:
        meta = pack_text(args.src, args.out, args.shard_size, args.unit, args.window,
                         args.seed, args.text_key, args.label_key,
                         args.max_record_bytes)  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"unipred data pack-text: {e}")
        return 2
    print(
        f"packed {meta['num_samples']} samples into {meta['num_shards']} shard(s) "
        f"({len(meta['classes'])} classes); skipped: {meta['skipped'].get('skipped/total', 0)} "
        f"{ {k: v for k, v in meta['skipped'].items() if k != 'skipped/total'} }"
    )
    print(f"data.root={meta['pattern']}")
    return 0 if meta["num_samples"] else 1
