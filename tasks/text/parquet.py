"""Parquet files of (text, label) records, read through pyarrow (the ``parquet`` extra).

A ``data.root`` may be one ``.parquet`` file or a folder of them (the usual layout of a
published data set: ``train-00000-of-00004.parquet``, ...). Each row is one record: its input
is the ``text_key`` column (a string, or binary holding UTF-8) or, when the file has one, the
``ids_key`` column (a list of integers, any vocabulary); its label the ``label_key`` column
(names or integers; absent or null: unlabelled, -1).

Row groups are read one batch at a time, so a large file never sits in memory whole. What
cannot be used is counted in the bad-sample report like every other text reader's input: a
null or empty text (``empty``), text that is not UTF-8 or holds a NUL byte (``invalid_utf8``,
``binary``), a record over ``max_record_bytes`` (``too_large``), an id list with a non-integer
(``corrupt``), and, in a folder, a file that is not Parquet at all (``read_error``, the rest
are read). A single file that cannot be read, or one without the named columns, stops the run
with one line naming the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

_BATCH = 4096  # rows read at a time


def _pyarrow():
    from unipred.base.extras import require

    return require("pyarrow.parquet", "parquet", "reading Parquet files")


def parquet_files(root: Path) -> list[Path]:
    """The ``.parquet`` files of a folder (not its sub-folders), sorted; [] if it has none."""
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".parquet")


def _rows(path: Path, text_key: str, label_key: str, ids_key: str):
    """(input column name, label column or None, batches of (inputs, labels)) of one file;
    a file that is not Parquet or lacks the columns -> ValueError naming it."""
    pq = _pyarrow()
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None  # fmt: skip
    names = f.schema_arrow.names
    key = ids_key if ids_key in names else text_key
    if key not in names:
        raise ValueError(f"{path}: no column {text_key!r} (or {ids_key!r}) in {names}")
    label = label_key if label_key in names else None
    columns = [key] + ([label] if label else [])

    def batches():
        try:
            for b in f.iter_batches(batch_size=_BATCH, columns=columns):
                inputs = b.column(0).to_pylist()
                labels = b.column(1).to_pylist() if label else [None] * len(inputs)
                yield inputs, labels
        except Exception as e:  # a damaged page past the footer
            raise ValueError(f"{path}: a damaged Parquet page ({type(e).__name__})") from None

    return key, batches()


def _input(value, is_ids: bool, what: str, max_bytes: int, counter):
    """One cell -> bytes / list of ids, or None (counted)."""
    from unipred.tasks.text.data import checked_text

    if value is None or (not is_ids and len(value) == 0) or (is_ids and not value):
        counter.count("empty", what)
        return None
    if is_ids:
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            counter.count("corrupt", f"{what}: not a list of integers")
            return None
        if len(value) > max_bytes:
            counter.count("too_large", f"{what}: {len(value)} ids")
            return None
        return value
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(raw) > max_bytes:
        counter.count("too_large", f"{what}: {len(raw)} bytes")
        return None
    if not raw.strip():
        counter.count("empty", what)
        return None
    return checked_text(raw, what, counter)


def read_parquet(path: Path, text_key: str, label_key: str, ids_key: str, max_bytes: int,
                 counter, classes=None):  # fmt: skip
    """(records [(bytes | list[int], label)], class names) of a ``.parquet`` file or a folder
    of them. Labels as names are indexed through ``classes`` (sorted names if None)."""
    from unipred.tasks.text.data import _label_index

    files = [path] if path.is_file() else parquet_files(path)
    rows, labels = [], []
    for file in files:
        try:
            key, batches = _rows(file, text_key, label_key, ids_key)
            n = 0
            for inputs, labs in batches:
                for value, lab in zip(inputs, labs):
                    n += 1
                    x = _input(value, key == ids_key, f"{file}:row {n}", max_bytes, counter)
                    if x is not None:
                        rows.append(x)
                        labels.append(-1 if lab in ("", None) else lab)
        except ValueError as e:
            if len(files) == 1 or "no column" in str(e):
                raise
            counter.count("read_error", str(file), e)  # one bad file of many: the rest count
    if all(v == -1 for v in labels):
        return [(x, -1) for x in rows], []
    ints, classes = _label_index(labels, classes)
    return list(zip(rows, ints)), classes
