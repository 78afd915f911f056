"""Bad data and odd folders never stop, hang or mislabel a run by themselves.

* A run of unreadable files, however long, is skipped and counted; only a fraction of the
  epoch above ``data.max_bad_fraction`` stops a run, with one line naming the folder.
* Folder scans follow no symlink that loops or leaves the data root, list each file once,
  never open a FIFO, and log the files per class.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from unipred.tasks.image.data import ImageFolderDataset

from unipred.data.accounting import BadSampleCounter
from unipred.data.scan import walk_files


def _good_images(folder: Path, n: int, start: int = 0, size: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"good{i:03d}.png"
        # the pixel value tells which file was delivered (for the exactly-once checks)
        Image.fromarray(np.full((size, size, 3), i % 256, np.uint8)).save(p)
        out.append(p)
    return out


def _nonzero(snap):
    return {k: v for k, v in snap.items() if v and not k.endswith("/total")}


# ----------------------------------------------------------- item 1: long runs of bad files
def test_seventy_empty_files_in_a_row_are_skipped_and_counted(tmp_path):
    root = tmp_path / "train"
    _good_images(root / "a", 30)
    _good_images(root / "b", 30, start=30)
    for i in range(70):  # a class folder synced half-way: 70 zero-byte files in a row
        (root / "b" / f"zz_empty{i:02d}.png").write_bytes(b"")
    counter = BadSampleCounter()
    ds = ImageFolderDataset(str(root), transform=lambda im: np.asarray(im)[0, 0, 0].item(),
                            counter=counter)  # fmt: skip
    assert len(ds) == 130
    dl = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=2, timeout=120)
    got = [int(v) for x, _ in dl for v in x]
    assert len(got) == 130  # batches stay full: each empty file's place is taken by a good one
    assert _nonzero(counter.snapshot()) == {"skipped/empty": 70}
    names = {Path(b["file"]).name for b in counter.bad_files()}
    assert names == {f"zz_empty{i:02d}.png" for i in range(70)}  # every file named, once
    # every good file is delivered for its own index once (substitutes fill the others)
    assert set(range(60)) <= set(got)


@pytest.mark.slow  # the same as a user runs it: a `unipred fit` process (~30 s of imports)
def test_too_many_unreadable_files_stop_a_unipred_fit_process_with_one_line(tmp_path):
    _half_synced(tmp_path / "train")
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unipred.cli", "fit", *PRE, f"data.root={tmp_path / 'train'}",
           f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("unipred fit: error")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "data.max_bad_fraction=0.05" in err[0] and str(tmp_path / "train" / "b") in err[0]


def test_a_split_with_no_readable_file_is_one_line(tmp_path):
    from unipred.data.book import NoReadableSample

    for i in range(5):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.jpg").write_bytes(b"")
    ds = ImageFolderDataset(str(tmp_path), counter=BadSampleCounter())
    with pytest.raises(NoReadableSample, match=r"none of its 5 files can be read"):
        ds[3]


PRE = ["task=image_pretrain", "model.name=nepa_debug", "trainer.progress_bar=false",
       "trainer.loggers=[]", "trainer.accelerator=cpu", "data.aug.img_size=16",
       "trainer.global_batch=10", "trainer.max_epochs=2", "data.num_workers=2",
       "ema.enabled=false", "trainer.collapse_every_n_steps=0", "trainer.threads=1"]  # fmt: skip


def _half_synced(root: Path, n_empty: int = 70) -> None:
    _good_images(root / "a", 40)
    _good_images(root / "b", 40, start=40)
    for i in range(n_empty):
        (root / "b" / f"zz_empty{i:02d}.png").write_bytes(b"")


def _fit_main(capsys, *over) -> tuple[int, str]:
    # the CLI's own entry point, in this process (a subprocess costs ~20 s of imports here)
    from unipred.cli import main

    code = main(["fit", *PRE, *over])
    return code, capsys.readouterr().err


def test_too_many_unreadable_files_stop_the_run_with_one_line(tmp_path, capsys):
    _half_synced(tmp_path / "train")  # 70 of 150 files empty: 47 % > 5 %
    code, stderr = _fit_main(capsys, f"data.root={tmp_path / 'train'}",
                             f"run_dir={tmp_path / 'run'}")  # fmt: skip
    assert code == 2, stderr[-3000:]
    err = [ln for ln in stderr.splitlines() if ln.startswith("unipred fit: error")]
    assert len(err) == 1 and "Traceback" not in stderr, stderr[-3000:]
    line = err[0]
    assert "data.max_bad_fraction=0.05" in line and "skipped/empty" in line, line
    assert str(tmp_path / "train" / "b") in line, line  # the folder holding them
    assert "skipped bad sample" not in stderr.split("unipred fit: error")[-1]  # the last line
    # stopped early in epoch 0 (not after the epoch): the report holds what it had met
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert [e["epoch"] for e in rep["epochs"]] == [0]
    assert 0 < rep["epochs"][0]["counts"]["skipped/empty"] <= 70


def test_below_the_fraction_a_long_run_of_empty_files_trains_and_is_counted(tmp_path):
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    _half_synced(tmp_path / "train")
    cfg = load_config(None, [*PRE, f"data.root={tmp_path / 'train'}",
                             f"run_dir={tmp_path / 'run'}", "data.max_bad_fraction=0.5"])  # fmt: skip
    trainer = fit(cfg)
    assert trainer.global_step == 30  # 150 samples, batch 10, 2 epochs
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    for e in rep["epochs"]:
        assert e["counts"]["skipped/empty"] == 70
        assert len(e["bad_files"]) == 70


def test_the_fraction_is_a_config_key_checked_at_load():
    from unipred.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="max_bad_fraction"):
        load_config(None, ["task=image_pretrain", "data.max_bad_fraction=1.5"])


# ------------------------------------------------------------------ item 2: folder scans
def _odd_tree(root: Path, outside: Path) -> None:
    _good_images(root / "0", 3)
    _good_images(root / "3", 2, start=3)
    os.symlink("..", root / "3" / "loop")  # train/3/loop -> train: a loop
    os.symlink(root / "3", root / "0" / "to3")  # a class folder reached from another
    os.symlink(root / "0" / "good000.png", root / "3" / "link_to_0.png")  # a file twice
    os.link(root / "0" / "good001.png", root / "3" / "hard.png")  # a hard link: same file
    _good_images(outside, 2, start=50)
    os.symlink(outside, root / "3" / "elsewhere")  # a folder out of the root
    os.symlink(outside / "good050.png", root / "0" / "out.png")  # a file out of the root
    os.mkfifo(root / "0" / "fifo.png")  # opening it would block forever
    os.symlink(root / "nothing.png", root / "0" / "broken.png")


def test_a_symlink_loop_and_duplicates_are_listed_once_with_the_right_labels(tmp_path, caplog):
    root, outside = tmp_path / "train", tmp_path / "outside"
    _odd_tree(root, outside)
    with caplog.at_level(logging.INFO):
        ds = ImageFolderDataset(str(root), counter=BadSampleCounter())
    got = sorted((Path(p).relative_to(root).as_posix(), y) for p, y in ds.samples)
    assert got == [("0/good000.png", 0), ("0/good001.png", 0), ("0/good002.png", 0),
                   ("3/good003.png", 1), ("3/good004.png", 1)]  # fmt: skip
    text = caplog.text
    assert f"{root}: 5 images in 2 classes (0: 3, 3: 2)" in text
    assert "symlinks leaving the data folder" in text and "looping back" in text
    assert "special files" in text and "second paths" in text and "broken symlinks" in text
    assert len(ds) == 5 and all(ds[i] is not None for i in range(5))


def test_following_links_out_of_the_root_is_on_request(tmp_path):
    from unipred.data.scan import ScanReport

    root, outside = tmp_path / "train", tmp_path / "outside"
    _odd_tree(root, outside)
    rep = ScanReport()
    files = walk_files(str(root), rep, follow_outside=True)
    rel = sorted(os.path.relpath(p, root) for p in files)
    # out.png and elsewhere/ now count; the loop, the FIFO and the second paths still do not
    assert rel == ["0/good000.png", "0/good001.png", "0/good002.png", "0/out.png",
                   "3/elsewhere/good051.png", "3/good003.png", "3/good004.png"]  # fmt: skip
    # loop, to3; link_to_0, hard.png, and good050 reached by out.png and by elsewhere/
    assert rep.loops == 2 and rep.special == 1 and rep.duplicates == 3


def test_audio_and_video_folder_scans_follow_the_same_rules(tmp_path):
    from unipred.tasks.audio.data import list_audio
    from unipred.tasks.video.data import list_videos

    root = tmp_path / "a"
    for c in ("x", "y"):
        (root / c).mkdir(parents=True)
        (root / c / f"{c}.wav").write_bytes(b"RIFF")
    os.symlink("..", root / "y" / "loop")
    os.mkfifo(root / "x" / "fifo.wav")
    os.symlink(root / "x" / "x.wav", root / "y" / "again.wav")
    items, classes = list_audio(root)
    assert sorted((p.name, y) for p, y in items) == [("x.wav", 0), ("y.wav", 1)]
    vroot = tmp_path / "v"
    for c in ("x", "y"):
        (vroot / c).mkdir(parents=True)
        (vroot / c / f"{c}.mp4").write_bytes(b"\0")
    os.mkfifo(vroot / "x" / "fifo.mp4")
    os.symlink(vroot / "x" / "x.mp4", vroot / "y" / "again.mp4")
    os.symlink(tmp_path / "a", vroot / "y" / "outside.mp4")
    samples, classes = list_videos(vroot)
    assert sorted((p.name, y) for p, y in samples) == [("x.mp4", 0), ("y.mp4", 1)]


# ------------------------------------------------------------------ item 4: the run folder
def test_a_run_dir_that_is_a_file_or_read_only_is_one_line_before_the_model(tmp_path, capsys):
    from unipred.cli import main
    from unipred.train.config import load_config
    from unipred.train.engine import fit
    from unipred.train.rundir import RunDirError, check_run_dir

    _good_images(tmp_path / "d" / "a", 10)
    (tmp_path / "afile").write_text("x")
    code = main(["fit", *PRE, f"data.root={tmp_path / 'd'}", f"run_dir={tmp_path / 'afile'}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.strip().splitlines() == [
        f"unipred fit: error: run_dir={tmp_path / 'afile'} is a file, not a folder; set "
        "run_dir to a folder (UNIPRED_DEBUG=1 shows the traceback)"
    ]
    with pytest.raises(RunDirError, match="a part of its path is a file|has a file where"):
        check_run_dir(tmp_path / "afile" / "run")
    # no model is built: the error comes before LitTask
    import unipred.train.engine as engine

    built = []
    orig = engine.LitTask.__init__
    engine.LitTask.__init__ = lambda self, *a, **k: built.append(1) or orig(self, *a, **k)
    try:
        with pytest.raises(RunDirError, match="is a file"):
            fit(load_config(None, [*PRE, f"data.root={tmp_path / 'd'}",
                                   f"run_dir={tmp_path / 'afile'}"]))  # fmt: skip
    finally:
        engine.LitTask.__init__ = orig
    assert built == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_dir_is_one_line(tmp_path):
    from unipred.train.rundir import RunDirError, check_run_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            check_run_dir(ro / "run")
        with pytest.raises(RunDirError, match="not writable"):
            check_run_dir(ro)
    finally:
        ro.chmod(0o700)


def test_read_only_and_full_file_systems_are_named(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from unipred.train import rundir

    def refuse(code):
        def open_(*a, **k):
            raise OSError(code, os.strerror(code))

        return open_

    monkeypatch.setattr("builtins.open", refuse(errno.EROFS))
    with pytest.raises(rundir.RunDirError, match="read-only file system"):
        rundir.check_run_dir(tmp_path / "r1")
    monkeypatch.setattr("builtins.open", refuse(errno.ENOSPC))
    with pytest.raises(rundir.RunDirError, match="full disk"):
        rundir.check_run_dir(tmp_path / "r2")
    monkeypatch.undo()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(rundir.RunDirError, match="1 MB free"):
        rundir.check_run_dir(tmp_path / "r3")


def test_every_reason_the_shipped_readers_count_is_in_the_docs():
    import unipred.tasks.audio.data  # noqa: F401  (each modality registers its reasons)
    import unipred.tasks.image.decode  # noqa: F401
    import unipred.tasks.text.data  # noqa: F401
    import unipred.tasks.video.data  # noqa: F401

    from unipred.data import shards  # noqa: F401
    from unipred.data.accounting import _COLUMNS, _OWNERS

    docs = (Path(__file__).parents[1] / "docs" / "faults.md").read_text()
    table = docs[docs.index("| Reason | Meaning |") :]
    # only the shipped package's reasons: other tests register made-up ones in this process
    shipped = [k for k in _COLUMNS if _OWNERS.get(k, "").startswith("unipred.")]
    assert "skipped/truncated" in shipped and "converted/cmyk" in shipped
    missing = [k for k in shipped if f"`{k}`" not in table and f"`{k.split('/')[1]}`" not in table]
    assert not missing, missing
