"""Property: whatever a data folder holds, a run finishes or stops with one line, every good
file is read exactly once per epoch and every bad one is counted exactly once.

Hypothesis builds random class folders of good and broken files of each modality (image,
audio, video), with empty files, symlinks (to a file already there, out of the data folder,
looping back, broken), hard links, FIFOs and empty folders. Files are told apart by their
inode: a second path to a file is the same file. The image folders go through a real
``fit`` (a tiny model, two epochs, batch 1 so an epoch reads every file); audio and video
folders through their readers for two epochs, as the engine drives them. The default suite
runs a few small examples; ``-m slow`` runs more and larger ones."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from unipred.data.accounting import BadSampleCounter
from unipred.data.book import error_line

GOOD, CONVERTED = "good", "converted"
# kinds of entries; real files first (the links point at them)
FILE_KINDS = ["good", "good", "good", "converted", "truncated", "empty", "text", "tiny"]
ODD_KINDS = ["dup_link", "hard_link", "outside_link", "loop", "parent_loop", "fifo",
             "broken_link", "empty_dir", "hidden"]  # fmt: skip


def plans(max_files: int):
    entry = st.tuples(st.integers(0, 2), st.sampled_from(FILE_KINDS + ODD_KINDS))
    return st.lists(entry, min_size=0, max_size=max_files)


# ------------------------------------------------------------------------ file makers
def _image(kind: str, path: Path, i: int) -> str | None:
    """Write an image of ``kind``; -> its expected reason (None: good)."""
    rng = np.random.default_rng(i)
    if kind in (GOOD, CONVERTED, "truncated"):
        a = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        img = Image.fromarray(a)
        if kind == CONVERTED:
            img.convert("P").save(path, format="PNG")
            return "converted/palette_or_alpha"
        img.save(path, format="PNG")
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            return "skipped/truncated"
        return None
    if kind == "empty":
        path.write_bytes(b"")
        return "skipped/empty"
    if kind == "text":
        path.write_text("not an image\n" * 10)
        return "skipped/corrupt"
    Image.new("RGB", (3, 2)).save(path, format="PNG")  # tiny
    return "skipped/tiny"


def _audio(kind: str, path: Path, i: int) -> str | None:
    import torch
    from unipred.tasks.audio.spoken_digits import write_wav

    t = torch.arange(4000) / 16000
    wave = 0.3 * torch.sin(2 * torch.pi * (200 + 40 * i) * t)
    if kind in (GOOD, "truncated", "tiny"):  # (audio has no "tiny": a good clip)
        write_wav(path, wave)
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            return "skipped/truncated"
        return None
    if kind == CONVERTED:
        write_wav(path, torch.zeros(4000))
        return "converted/silent"
    if kind == "empty":
        path.write_bytes(b"")
        return "skipped/empty"
    path.write_text("not audio\n" * 20)
    return "skipped/corrupt"


def _video(kind: str, path: Path, i: int) -> str | None:
    import torch
    from unipred.tasks.video.data import write_video

    if kind in (GOOD, CONVERTED, "tiny", "truncated"):  # (no video conversions)
        write_video(path, torch.full((4, 3, 16, 16), 20 * (i % 12), dtype=torch.uint8),
                    preset="ultrafast")  # fmt: skip
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            return "skipped/corrupt"  # its index is cut off
        return None
    if kind == "empty":
        path.write_bytes(b"")
        return "skipped/empty"
    path.write_text("not a video\n" * 20)
    return "skipped/corrupt"


MAKERS = {"image": (_image, ".png"), "audio": (_audio, ".wav"), "video": (_video, ".mp4")}


def build(plan, modality: str, base: Path):
    """The folder ``base/data`` of ``plan`` -> {inode: expected reason or None} of the files
    that are samples (regular files with the modality's extension inside the data folder)."""
    make, ext = MAKERS[modality]
    root, outside = base / "data", base / "outside"
    outside.mkdir(parents=True)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
    truth: dict[int, str | None] = {}
    real: list[Path] = []
    for i, (c, kind) in enumerate(sorted(plan, key=lambda e: e[1] in ODD_KINDS)):
        folder = root / f"c{c}"
        path = folder / f"f{i:02d}{ext}"
        if kind in FILE_KINDS:
            reason = make(kind, path, i)
            truth[path.stat().st_ino] = reason
            real.append(path)
        elif kind == "dup_link" and real:
            os.symlink(real[i % len(real)], path)
        elif kind == "hard_link" and real:
            os.link(real[i % len(real)], path)
        elif kind == "outside_link":
            make(GOOD, outside / f"o{i}{ext}", i)
            os.symlink(outside / f"o{i}{ext}", path)
        elif kind == "loop":
            os.symlink(root, folder / f"loop{i}")
        elif kind == "parent_loop":
            os.symlink("..", folder / f"up{i}")
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "broken_link":
            os.symlink(folder / "nothing", path)
        elif kind == "empty_dir":
            (folder / f"empty{i}").mkdir()
        elif kind == "hidden":
            make(GOOD, folder / f".hidden{i}{ext}", i)
    for c in range(3):  # a class folder left empty: give it a note (not a sample)
        if not any((root / f"c{c}").iterdir()):
            (root / f"c{c}" / "README.txt").write_text("empty class")
    return root, truth


def _ino(path) -> int:
    return os.stat(path).st_ino


def _expected(truth, frac):
    bad = sum(1 for r in truth.values() if r and r.startswith("skipped/"))
    if not truth:
        return "no files"
    if bad == len(truth):
        return "nothing readable"
    if frac < 1 and bad > frac * len(truth):
        return "too many"
    return "finishes"


def _one_line(e: BaseException) -> None:
    assert isinstance(e, ValueError), repr(e)
    assert "\n" not in error_line(e) and error_line(e), repr(e)


# ------------------------------------------------------------------------ image: a fit
def _image_fit(plan, frac):
    import lightning as L
    from unipred.tasks.image import data as image_data

    from unipred.data.epoch_report import TooManyBadSamples
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    base = Path(tempfile.mkdtemp(prefix="baddata-prop-"))
    try:
        root, truth = build(plan, "image", base)
        outcome = _expected(truth, frac)
        own = []  # (index, delivered) of every read of a sample for its own index
        fetch = image_data.ImageFolderDataset._fetch

        def spy(self, j, counter):
            out = fetch(self, j, counter)
            if not getattr(counter, "silent", True):
                own.append((j, out is not None))
            return out

        class Epochs(L.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                own.append(("end", None))

        image_data.ImageFolderDataset._fetch = spy
        over = ["task=image_pretrain", "model.name=nepa_debug", "trainer.progress_bar=false",
                "trainer.loggers=[]", "trainer.accelerator=cpu", "data.aug.img_size=16",
                "trainer.global_batch=1", "trainer.max_epochs=2", "data.num_workers=0",
                "ema.enabled=false", "trainer.collapse_every_n_steps=0", "trainer.threads=1",
                "trainer.ckpt_every_n_steps=0", f"data.max_bad_fraction={frac}",
                f"data.root={root}", f"run_dir={base / 'run'}"]  # fmt: skip
        try:
            fit(load_config(None, over), callbacks=[Epochs()])
            got = "finishes"
        except TooManyBadSamples as e:
            _one_line(e)
            got = "too many"
        except ValueError as e:
            _one_line(e)
            got = "nothing readable" if "none of its" in str(e) else "no files"
        finally:
            image_data.ImageFolderDataset._fetch = fetch
        assert got == outcome, (got, outcome, plan)
        event(f"image run: {got}")
        if got != "finishes":
            return
        ds_paths = image_data.scan_image_folder(str(root))[0]
        inodes = [_ino(p) for p, _ in ds_paths]
        assert sorted(inodes) == sorted(truth), plan  # each file once, no link, loop or FIFO
        epochs, cur = [], []
        for rec in own:
            if rec[0] == "end":
                epochs.append(cur)
                cur = []
            else:
                cur.append(rec)
        assert len(epochs) == 2
        for reads in epochs:  # each file read for its own index once; good ones delivered
            assert sorted(j for j, _ in reads) == list(range(len(inodes)))
            good = {inodes[j] for j, ok in reads if ok}
            assert good == {i for i, r in truth.items() if not (r or "").startswith("skipped/")}
        import json

        rep = json.loads((base / "run" / "data_report.json").read_text())
        want = Counter(r for r in truth.values() if r)
        for e in rep["epochs"]:
            assert {k: v for k, v in e["counts"].items() if v and "total" not in k} == want
            named = Counter((b["reason"], _ino(b["file"])) for b in e["bad_files"])
            assert named == Counter((r, i) for i, r in truth.items() if r)  # each once
    finally:
        shutil.rmtree(base, ignore_errors=True)


FRACS = st.sampled_from([0.05, 0.3, 1.0])
# a folder with one of everything (the default suite's random examples are few)
RICH = [(0, "good"), (1, "good"), (2, "good"), (0, "converted"), (1, "truncated"),
        (2, "empty"), (0, "text"), (1, "tiny"), (0, "dup_link"), (1, "hard_link"),
        (2, "outside_link"), (0, "loop"), (1, "parent_loop"), (2, "fifo"), (0, "broken_link"),
        (1, "empty_dir"), (2, "hidden"), (1, "good")]  # fmt: skip
SMALL = settings(max_examples=3, deadline=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))  # fmt: skip
LARGE = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@SMALL
@given(plan=plans(8), frac=FRACS)
@example(plan=RICH, frac=1.0)  # finishes: every count and name checked
@example(plan=RICH, frac=0.3)  # 4 of 9 unreadable: stops in one line
def test_random_image_folders_through_a_run(plan, frac):
    _image_fit(plan, frac)


@pytest.mark.slow  # 25 runs of two epochs: ~3 min on a loaded 2-core box
@LARGE
@given(plan=plans(16), frac=FRACS)
def test_random_image_folders_through_a_run_many(plan, frac):
    _image_fit(plan, frac)


# -------------------------------------------------------------- audio, video: readers
def _reader_epochs(plan, modality):
    import torch

    base = Path(tempfile.mkdtemp(prefix="baddata-prop-"))
    try:
        root, truth = build(plan, modality, base)
        bad = sum(1 for r in truth.values() if (r or "").startswith("skipped/"))
        event(f"{modality}: {len(truth)} files, {bad} unreadable")
        counter = BadSampleCounter()
        try:
            if modality == "audio":
                from unipred.tasks.audio.data import ClipTransform, audio_dataset

                ds = audio_dataset(str(root), ClipTransform(16000, 0.25, 0.25), counter=counter)
            else:
                from unipred.tasks.video.data import ClipTransform, VideoFolder

                ds = VideoFolder(root, 2, 1, ClipTransform(size=8, scale=1.0), counter=counter)
        except ValueError as e:  # nothing to read: one line
            _one_line(e)
            assert not truth, plan
            return
        paths = [p for p, _ in (ds.items if modality == "audio" else ds.samples)]
        inodes = [_ino(p) for p in paths]
        assert sorted(inodes) == sorted(truth), plan
        readable = {i for i, r in truth.items() if not (r or "").startswith("skipped/")}
        for _ in range(2):  # two epochs, as the engine reads them (counter reset between)
            own = []
            fetch = ds._fetch

            def spy(j, c, _fetch=fetch, _own=own):
                out = _fetch(j, c)
                if not getattr(c, "silent", True):
                    _own.append((j, out is not None))
                return out

            ds._fetch = spy
            try:
                items = [ds[i] for i in range(len(ds))]
            except ValueError as e:
                _one_line(e)
                assert not readable, plan
                return
            finally:
                del ds._fetch
            assert all(isinstance(x[0], torch.Tensor) for x in items)
            assert sorted(j for j, _ in own) == list(range(len(ds)))
            assert {inodes[j] for j, ok in own if ok} == readable
            snap = {k: v for k, v in counter.snapshot().items() if v and "total" not in k}
            assert snap == Counter(r for r in truth.values() if r), plan
            named = Counter((b["reason"], _ino(b["file"])) for b in counter.bad_files())
            assert named == Counter((r, i) for i, r in truth.items() if r)
            counter.reset()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@SMALL
@given(plan=plans(7))
@example(plan=RICH)
def test_random_audio_folders_through_the_reader(plan):
    pytest.importorskip("torchcodec")
    _reader_epochs(plan, "audio")


@SMALL
@given(plan=plans(5))
@example(plan=RICH)
def test_random_video_folders_through_the_reader(plan):
    pytest.importorskip("torchcodec")
    _reader_epochs(plan, "video")


@pytest.mark.slow  # larger folders, more examples: ~2 min
@LARGE
@given(plan=plans(14), modality=st.sampled_from(["audio", "video"]))
def test_random_audio_and_video_folders_many(plan, modality):
    pytest.importorskip("torchcodec")
    _reader_epochs(plan, modality)
