"""Parquet (text, label) records for the text data source: real files written with pyarrow, read
by the shipped reader and by `unipred fit` / `unipred data pack-text` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from unipred.tasks.text.data import read_records

from unipred.data.accounting import BadSampleCounter

ENV = {**os.environ, "PYTHONSAFEPATH": "1"}


def _write(path, **columns):
    pq.write_table(pa.table(columns), path, row_group_size=3)  # several row groups
    return path


def _bad_table(path):
    """Six rows: three good, a null text, an empty one, one over 1,000 bytes."""
    texts = ["hello world", None, "bonjour", "", "x" * 2000, "hallo welt"]
    return _write(path, text=texts, label=["en", "en", "fr", "fr", "de", "de"])


def test_parquet_text_records_and_bad_rows_counted(tmp_path):
    counter = BadSampleCounter()
    recs, classes = read_records(str(_bad_table(tmp_path / "d.parquet")), max_bytes=1000,
                                 counter=counter)  # fmt: skip
    assert classes == ["de", "en", "fr"]
    assert recs == [(b"hello world", 1), (b"bonjour", 2), (b"hallo welt", 0)]
    snap = counter.snapshot()
    assert snap["skipped/empty"] == 2 and snap["skipped/too_large"] == 1
    # validation reads its labels through training's class order
    recs, _ = read_records(str(tmp_path / "d.parquet"), max_bytes=1000, classes=["fr", "en", "de"])
    assert [y for _, y in recs] == [1, 0, 2]


def test_parquet_binary_text_ids_and_int_labels(tmp_path):
    p = _write(tmp_path / "b.parquet", text=pa.array([b"ok", b"\xff\xfe", b"a\x00b"], pa.binary()),
               label=[0, 1, 1])  # fmt: skip
    counter = BadSampleCounter()
    recs, classes = read_records(str(p), counter=counter)
    assert recs == [(b"ok", 0)] and classes == []
    snap = counter.snapshot()
    assert snap["skipped/invalid_utf8"] == 1 and snap["skipped/binary"] == 1
    ids = _write(tmp_path / "i.parquet", ids=[[1, 2, 3], [], [7]], label=["a", "b", "a"])
    counter = BadSampleCounter()
    recs, classes = read_records(str(ids), counter=counter)
    assert recs == [([1, 2, 3], 0), ([7], 0)] and classes == ["a"]
    assert counter.snapshot()["skipped/empty"] == 1
    unlabelled = _write(tmp_path / "u.parquet", text=["one", "two"])
    assert read_records(str(unlabelled)) == ([(b"one", -1), (b"two", -1)], [])


def test_a_folder_of_parquet_files_skips_and_counts_a_damaged_one(tmp_path):
    root = tmp_path / "train"
    root.mkdir()
    _write(root / "part-0.parquet", text=["alpha", "beta"], label=["a", "b"])
    _write(root / "part-1.parquet", text=["gamma"], label=["a"])
    (root / "part-2.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    counter = BadSampleCounter()
    recs, classes = read_records(str(root), counter=counter)
    assert recs == [(b"alpha", 0), (b"beta", 1), (b"gamma", 0)] and classes == ["a", "b"]
    assert counter.snapshot()["skipped/read_error"] == 1


def test_damaged_file_and_missing_column_are_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file") as e:
        read_records(str(bad))
    assert "\n" not in str(e.value)
    # a file cut short (a download stopped half way): its footer is gone
    good = _write(tmp_path / "good.parquet", text=["a"] * 100, label=["x"] * 100)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.parquet: not a readable Parquet file"):
        read_records(str(cut))
    with pytest.raises(ValueError, match=r"good.parquet: no column 'body' \(or 'ids'\)"):
        read_records(str(good), text_key="body")


def test_without_pyarrow_the_error_names_the_extra(tmp_path, monkeypatch):
    from unipred.base.extras import MissingExtra

    p = _write(tmp_path / "d.parquet", text=["a"])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now fails
    with pytest.raises(MissingExtra, match=r"pip install 'unipred\[parquet\]'"):
        read_records(str(p))


def _fit_args(tmp_path, root, *extra):
    return ["fit", "task=text_pretrain", f"data.root={root}", "data.corpus=''",
            "model.name=nepa_text_debug", "data.num_workers=0", "data.max_record_bytes=1000",
            "data.max_bad_fraction=1", "trainer.global_batch=2", "trainer.max_steps=2",
            "trainer.accelerator=cpu", "trainer.precision=32-true", f"run_dir={tmp_path / 'run'}",
            "trainer.loggers=[]", "trainer.progress_bar=false", *extra]  # fmt: skip


def test_fit_on_parquet_reports_bad_rows_and_refuses_a_damaged_file(tmp_path):
    from unipred.cli import main

    # the run in this process (the command's own entry point); the refusal as a person sees
    # it, from the `unipred` command in a subprocess
    assert main(_fit_args(tmp_path, _bad_table(tmp_path / "d.parquet"))) == 0
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["total"]
    assert report["skipped/empty"] == 2 and report["skipped/too_large"] == 1
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    cmd = [sys.executable, "-m", "unipred", *_fit_args(tmp_path, bad)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if "bad.parquet" in ln]
    assert len(lines) == 1 and "not a readable Parquet file" in lines[0]
    assert "Traceback" not in res.stderr


def test_pack_text_reads_parquet(tmp_path):
    out = tmp_path / "shards"
    res = subprocess.run([sys.executable, "-m", "unipred.cli", "data", "pack-text",
                          str(_bad_table(tmp_path / "d.parquet")), str(out),
                          "--max-record-bytes", "1000"],
                         capture_output=True, text=True, env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == 3 and meta["classes"] == ["de", "en", "fr"]
    assert meta["skipped"]["skipped/empty"] == 2 and meta["skipped"]["skipped/too_large"] == 1
