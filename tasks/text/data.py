"""Text and id-sequence records: readers that never crash on bad input, windows, collation.

Layouts a ``data.root`` may have (``read_records``):

* a folder of class sub-folders of text files (``root/<class>/*``); with ``unit=line`` each
  non-empty line of a file is one record, with ``unit=file`` the whole file is;
* a folder of text files without class sub-folders (unlabelled, label -1; pretraining);
* a ``.jsonl`` file of ``{"text": ..., "label": ...}`` records (keys configurable); a record
  may give ``"ids": [int, ...]`` instead of text (any vocabulary, ``vocab_size`` ids);
* a ``.csv`` / ``.tsv`` file with a header naming the text and label columns, one record a line;
* a ``.parquet`` file, or a folder of them, with the same columns (``tasks/text/parquet.py``,
  needs pyarrow: the ``parquet`` extra);
* webdataset shards from ``unipred data pack-text`` (``TextShards``, streamed).

Bad input is skipped and counted in the bad-sample report (``unipred.data.accounting``), never
fatal: a line that is not UTF-8 (``invalid_utf8``), an empty line (``empty``), a binary file
(``binary``: a NUL byte in its first 8 KiB), a line or file longer than ``max_record_bytes``
(``too_large``; read in bounded chunks, so a 2 GB line costs one pass over it and 1 MiB of
memory), an unparsable JSON / CSV record (``corrupt``), an unreadable file (``read_error``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from unipred.data.accounting import COUNTER, BadSampleCounter, register_reasons
from unipred.data.shards import ShardReader

register_reasons(skipped=("invalid_utf8", "binary"))

_CHUNK = 1 << 20  # bytes read at a time while skipping the rest of an over-long line
_SNIFF = 8192  # bytes a file is checked for NUL (binary) before it is read as text
TEXT_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")


def bounded_lines(f, max_bytes: int, what: str, counter: BadSampleCounter):
    """Lines of a binary file object without their line break, at most ``max_bytes`` each.

    An over-long line is counted (``too_large``) and skipped by reading the rest of it in
    1 MiB chunks, so memory stays bounded whatever its length; an empty (or blank) line is
    counted (``empty``) and skipped."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            counter.count("too_large", f"{what}: a line over {max_bytes} bytes")
            while True:  # the rest of the long line, chunk by chunk
                rest = f.readline(_CHUNK)
                if not rest or rest.endswith(b"\n"):
                    break
            continue
        line = line.rstrip(b"\r\n")
        if not line.strip():
            counter.count("empty", what)
            continue
        yield line


def checked_text(raw: bytes, what: str, counter: BadSampleCounter) -> bytes | None:
    """``raw`` when it is UTF-8 text, else None (counted as ``binary`` or ``invalid_utf8``)."""
    if b"\0" in raw:
        counter.count("binary", what)
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        counter.count("invalid_utf8", f"{what}: byte {e.start}")
        return None
    return raw


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF)


def read_file_records(path: Path, unit: str, max_bytes: int, counter) -> list[bytes]:
    """The records of one text file (``unit`` line | file); bad ones skipped and counted."""
    what = str(path)
    try:
        if _is_binary(path):
            counter.count("binary", what)
            return []
        if unit == "file":
            if path.stat().st_size > max_bytes:
                counter.count("too_large", f"{what}: over {max_bytes} bytes")
                return []
            raw = path.read_bytes().strip()
            if not raw:
                counter.count("empty", what)
                return []
            ok = checked_text(raw, what, counter)
            return [] if ok is None else [ok]
        with open(path, "rb") as f:
            out = []
            for i, line in enumerate(bounded_lines(f, max_bytes, what, counter)):
                ok = checked_text(line, f"{what}:{i + 1}", counter)
                if ok is not None:
                    out.append(ok)
            return out
    except OSError as e:
        counter.count("read_error", what, e)
        return []


def _files(folder: Path) -> list[Path]:
    # each file once, no symlink looping or leaving the folder, no FIFO (unipred.data.scan)
    from unipred.data.scan import walk_files

    return sorted(Path(p) for p in walk_files(str(folder)))


def read_folder(root: Path, unit: str, max_bytes: int, counter, classes=None):
    """(records [(bytes, label)], class names) of a folder: class sub-folders, or loose files
    (label -1). ``classes`` fixes the class order (validation uses training's)."""
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        recs = [r for f in _files(root) for r in read_file_records(f, unit, max_bytes, counter)]
        return [(r, -1) for r in recs], []
    classes = list(classes) if classes else subdirs
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for name in subdirs:
        if name not in index:
            raise ValueError(f"{root}/{name}: a class the training data do not have ({classes})")
        for f in _files(root / name):
            out += [(r, index[name]) for r in read_file_records(f, unit, max_bytes, counter)]
    return out, classes


def _label_index(labels: list, classes=None) -> tuple[list[int], list[str]]:
    """Labels as ints: int labels kept, names mapped through ``classes`` (sorted if None)."""
    if all(isinstance(v, int) for v in labels):
        return [int(v) for v in labels], list(classes or [])
    names = [str(v) for v in labels]
    classes = list(classes) if classes else sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the training classes {classes}")
    return [index[n] for n in names], classes


def read_table(path: Path, text_key: str, label_key: str, ids_key: str, max_bytes: int,
               counter, classes=None):  # fmt: skip
    """(records, classes) of a JSONL or CSV/TSV file, one record a line. A record's input is
    its text (UTF-8 bytes) or, in JSONL, a list of ids under ``ids_key``; no label = -1."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from unipred.tasks.text.parquet import read_parquet

        return read_parquet(path, text_key, label_key, ids_key, max_bytes, counter, classes)
    rows, labels = [], []
    header = None
    with open(path, "rb") as f:
        for n, line in enumerate(bounded_lines(f, max_bytes, str(path), counter)):
            what = f"{path}:{n + 1}"
            if checked_text(line, what, counter) is None:
                continue
            try:
                if suffix == ".jsonl":
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("not an object")
                else:
                    cells = next(csv.reader(io.StringIO(line.decode()),
                                            delimiter="\t" if suffix == ".tsv" else ","))  # fmt: skip
                    if header is None:
                        header = cells
                        if text_key not in header:
                            raise ValueError(f"{path}: no column {text_key!r} in {header}")
                        continue
                    rec = dict(zip(header, cells))
                x = _record_input(rec, text_key, ids_key)
            except (ValueError, TypeError) as e:
                if header is not None and "no column" in str(e):
                    raise
                counter.count("corrupt", what, e)
                continue
            if x is None or len(x) == 0:
                counter.count("empty", what)
                continue
            rows.append(x)
            label = rec.get(label_key, -1)
            labels.append(label if label not in ("", None) else -1)
    unlabelled = all(v == -1 for v in labels)
    if unlabelled:
        return [(x, -1) for x in rows], []
    ints, classes = _label_index(labels, classes)
    return list(zip(rows, ints)), classes


def _record_input(rec: dict, text_key: str, ids_key: str):
    if ids_key in rec:
        ids = rec[ids_key]
        if not isinstance(ids, list) or not all(isinstance(v, int) for v in ids):
            raise ValueError(f"{ids_key!r} is not a list of integers")
        return ids
    text = rec.get(text_key)
    if not isinstance(text, str):
        raise ValueError(f"no text under {text_key!r}")
    return text.encode("utf-8")


def read_records(spec: str, unit: str = "line", text_key: str = "text",
                 label_key: str = "label", ids_key: str = "ids",
                 max_bytes: int = 1 << 20, counter: BadSampleCounter | None = None,
                 classes=None):  # fmt: skip
    """(records [(bytes | list[int], label)], class names) of a folder or a JSONL/CSV file."""
    counter = counter or COUNTER
    path = Path(spec)
    if path.is_dir():
        from unipred.tasks.text.parquet import parquet_files, read_parquet

        if parquet_files(path) and not any(p.is_dir() for p in path.iterdir()):
            return read_parquet(path, text_key, label_key, ids_key, max_bytes, counter, classes)
        return read_folder(path, unit, max_bytes, counter, classes)
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        return read_table(path, text_key, label_key, ids_key, max_bytes, counter, classes)
    if path.is_file():  # one plain text file: unlabelled records
        recs = read_file_records(path, unit, max_bytes, counter)
        return [(r, -1) for r in recs], []
    raise ValueError(f"{spec}: not a folder, a .jsonl/.csv/.tsv/.parquet file or a text file")


def to_ids(x) -> torch.Tensor:
    """bytes or a list of ids -> a 1-D LongTensor."""
    if isinstance(x, (bytes, bytearray)):
        return torch.frombuffer(bytearray(x), dtype=torch.uint8).long()
    return torch.as_tensor(x, dtype=torch.long)


class TextRecords(Dataset):
    """Map-style records as ``(ids (n,) long, label)`` of at most ``context`` ids.

    ``windows``: every record is cut into consecutive windows of ``context`` ids (a tail of
    fewer than ``min_len`` ids is dropped unless it is the whole record), each one sample (what
    pretraining on long documents wants). Otherwise each record is one sample cut to
    ``context`` ids: a random window when ``augment``, else its start."""

    def __init__(self, records: list, classes: list[str], context: int, windows: bool = False,
                 augment: bool = False, min_len: int = 1):  # fmt: skip
        if context < 1:
            raise ValueError(f"data.context={context} must be >= 1")
        self.records, self.classes, self.context = records, classes, context
        self.augment = augment
        self.items = [(i, 0) for i in range(len(records))]
        if windows:
            self.items = []
            for i, (x, _) in enumerate(records):
                starts = range(0, max(1, len(x)), context)
                self.items += [(i, s) for s in starts if s == 0 or len(x) - s >= min_len]
        # dataset_labels reads (x, label) pairs from ``samples``
        self.samples = [(i, records[i][1]) for i, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        r, start = self.items[i]
        x, label = self.records[r]
        if self.augment and len(x) > self.context and start == 0:
            start = _random_start(len(x), self.context)
        return to_ids(x[start : start + self.context]), int(label)


class TextShards(ShardReader):
    """Records streamed from ``unipred data pack-text`` shards (``txt`` or ``ids.json``, and
    ``cls``): a random ``context`` window of each when training, its start otherwise."""

    def __init__(self, spec: str, context: int, training: bool, shuffle_buffer: int = 1000,
                 seed: int = 0, counter: BadSampleCounter | None = None):  # fmt: skip
        super().__init__(spec, None, training, shuffle_buffer, seed, counter=counter)
        self.context = context

    def decode(self, sample: dict):
        what = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            if "txt" in sample:
                x = checked_text(bytes(sample["txt"]), what, self.counter)
                if x is None:
                    return None
            elif "ids.json" in sample:
                x = json.loads(sample["ids.json"])
                if not isinstance(x, list):
                    raise ValueError("ids.json is not a list")
            else:
                raise ValueError(f"no txt or ids.json in sample (keys {sorted(sample)})")
        except Exception as err:  # a broken sample is skipped, never the epoch
            self.counter.count("corrupt", what, err)
            return None
        if len(x) == 0:
            self.counter.count("empty", what)
            return None
        start = 0
        if self.training and len(x) > self.context:
            start = _random_start(len(x), self.context)
        label = int(sample["cls"]) if "cls" in sample else -1
        return to_ids(x[start : start + self.context]), label


def _random_start(n: int, context: int) -> int:
    # torch's generator: the DataLoader seeds it per worker and per epoch
    return int(torch.randint(n - context + 1, ()).item())


def pad_collate(batch: list) -> tuple[dict, torch.Tensor]:
    """[(ids (n_i,), label)] -> ({"ids": (B, max n) zero-padded, "lengths": (B,)}, labels)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        raise ValueError("every sample of this batch was unreadable")
    lengths = torch.tensor([b[0].numel() for b in batch], dtype=torch.long)
    ids = torch.zeros(len(batch), max(1, int(lengths.max())), dtype=torch.long)
    for i, (x, _) in enumerate(batch):
        ids[i, : x.numel()] = x
    labels = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
    return {"ids": ids, "lengths": lengths}, labels
