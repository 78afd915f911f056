"""The data report counts each file once per epoch, under one reason, names each file it
counts, and stays exact across a preemption and a resume.

The broken-file corpus of each modality (tests/test_bad_inputs.py) is read from a folder and
from shards through the engine's resumable loader with DataLoader workers; in epoch 0 the
process is "preempted" after a few batches (workers had prefetched more), and a new reader,
loader and counter resume from what a checkpoint holds (the loader position and the
counter's state). Every count and every name of each epoch is compared with the truth. A
real ``fit`` stopped by SIGTERM and resumed with ``resume=auto`` checks the same through
``RUN_DIR/data_report.json``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from unipred.data.accounting import BadSampleCounter
from unipred.data.loader import EpochSampler, build_loader


def _corpora():
    # the corpus builders of test_bad_inputs.py (tests/ is no package: loaded by path)
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_bad_inputs_corpora", Path(__file__).with_name("test_bad_inputs.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_C = _corpora()
audio_corpus, image_corpus, video_corpus = _C.audio_corpus, _C.image_corpus, _C.video_corpus


def _start_epoch(loader, epoch):
    # what Lightning and the engine do at an epoch start
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def epochs_with_a_preemption(make_ds, epochs=2, stop_after=2, bs=2, workers=2, collate=None):
    """Per epoch: (counts, names) as the engine reports them; epoch 0 is cut after
    ``stop_after`` batches and resumed in a fresh reader, loader and counter."""

    def build(counter):
        ds = make_ds(counter)
        return ds, build_loader(ds, bs, 1, 0, 1, 7, True, workers, collate)

    counter = BadSampleCounter()
    ds, loader = build(counter)
    out = []
    for epoch in range(epochs):
        _start_epoch(loader, epoch)
        it = iter(loader)
        for b, _ in enumerate(it):
            loader.mark_consumed(epoch)
            if epoch == 0 and b + 1 == stop_after:
                break
        else:
            it = None
        if it is not None:  # preempted: only what a checkpoint holds survives
            position, state = loader.state_dict(), counter.state_dict()
            del it, loader, ds
            counter = BadSampleCounter()
            counter.load_state_dict(state)  # Lightning restores callbacks before the data
            ds, loader = build(counter)
            loader.load_state_dict(position)
            _start_epoch(loader, epoch)
            for _ in loader:
                loader.mark_consumed(epoch)
        snap = {k: v for k, v in counter.snapshot().items() if v and not k.endswith("/total")}
        out.append((snap, counter.bad_files()))
        counter.reset()
    return out


def check(epochs, truth: dict[str, str], ident):
    """Each epoch: counts == the truth's, and each counted file named once, under its reason."""
    want = dict(Counter(truth.values()))
    for e, (snap, names) in enumerate(epochs):
        assert snap == want, (e, snap, want)
        got = sorted((n["reason"], ident(n["file"])) for n in names)
        assert got == sorted((r, f) for f, r in truth.items()), (e, got)


def _bad(corpus):
    return {Path(p).name: r for p, r in corpus.items() if r}


# ------------------------------------------------------------------------------ images
def test_image_corpus_in_a_folder_resumed_mid_epoch(tmp_path):
    from unipred.tasks.image.data import ImageFolderDataset

    corpus = image_corpus(tmp_path / "tree")  # 24 files: 6 skipped, 4 converted
    epochs = epochs_with_a_preemption(
        lambda c: ImageFolderDataset(str(tmp_path / "tree"), lambda im: 0, counter=c), bs=4
    )
    check(epochs, _bad(corpus), lambda f: Path(f).name)


def test_image_corpus_in_shards_resumed_mid_epoch(tmp_path):
    from unipred.tasks.image.data import ShardDataset

    from unipred.data.cli import main

    corpus = image_corpus(tmp_path / "tree")
    assert main(["pack-images", str(tmp_path / "tree"), str(tmp_path / "shards"),
                 "--workers", "1", "--no-verify", "--max-per-shard", "6"]) == 0  # fmt: skip
    # one worker: its quota (every sample) is more than the good ones, so it reads every
    # sample in its first pass (a second pass, to fill the quota, counts nothing)
    epochs = epochs_with_a_preemption(
        lambda c: ShardDataset(str(tmp_path / "shards"), lambda im: 0, shuffle_buffer=4,
                               counter=c), bs=1, workers=1, stop_after=5)  # fmt: skip
    # shard names are "URL:KEY", the key ends with the file's stem
    stem = {Path(p).stem: Path(p).name for p in corpus}
    check(epochs, _bad(corpus), lambda f: stem[f.rsplit(":", 1)[1].split("_", 1)[1]])


def test_a_colour_image_greyed_for_a_grey_model_counts_once_with_its_name(tmp_path):
    """The issue's case: 3 colour files among grey ones, read by a 1-channel model; bad files
    right before them make them substitutes too."""
    from unipred.tasks.image.checks import ToChannels
    from unipred.tasks.image.data import ImageFolderDataset

    root = tmp_path / "digits" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / f"g{i}.png")
    for i in range(3):
        (root / f"c{i}_0bad.png").write_bytes(b"")  # sorted right before its colour file
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
            root / f"c{i}_1colour.png"
        )
    epochs = epochs_with_a_preemption(
        lambda c: ImageFolderDataset(str(tmp_path / "digits"), ToChannels(1), counter=c),
        bs=3, collate=lambda b: len(b),
    )  # fmt: skip
    truth = {f"c{i}_0bad.png": "skipped/empty" for i in range(3)}
    truth.update({f"c{i}_1colour.png": "converted/color_to_gray" for i in range(3)})
    check(epochs, truth, lambda f: Path(f).name)


# ------------------------------------------------------------------------------- audio
def test_audio_corpus_in_a_folder_and_in_shards_resumed_mid_epoch(tmp_path):
    pytest.importorskip("torchcodec")
    from unipred.tasks.audio.data import AudioShardDataset, ClipTransform, audio_dataset
    from unipred.tasks.audio.data import pad_collate as collate
    from unipred.tasks.audio.pack import add_arguments, pack_audio

    corpus = audio_corpus(tmp_path / "src")  # 14 clips: 4 skipped, 4 converted
    tf = ClipTransform(16000, 0.5, 0.5)
    epochs = epochs_with_a_preemption(
        lambda c: audio_dataset(str(tmp_path / "src"), tf, counter=c), collate=collate
    )
    check(epochs, _bad(corpus), lambda f: Path(f).name)

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(tmp_path / "src"), str(tmp_path / "shards"), "--keep-original",
                         "--shard-size", "4", "--stats-clips", "0"])  # fmt: skip
    meta = pack_audio(args)
    left_out = {Path(s.split(": ")[0]).name for s in meta["skipped"]}
    source = {}  # shard key -> file name (the packer keeps the source in each sample's json)
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf_:
            for m in tf_:
                if m.name.endswith(".json"):
                    key = m.name.rsplit(".", 1)[0]
                    source[key] = Path(json.loads(tf_.extractfile(m).read())["source"]).name
    assert meta["num_samples"] + len(left_out) == len(corpus) == len(source) + len(left_out)
    epochs = epochs_with_a_preemption(
        lambda c: AudioShardDataset(str(tmp_path / "shards"), ClipTransform(16000, 0.5, 0.5,
                                    True), shuffle_buffer=4, counter=c),
        bs=1, workers=1, stop_after=3, collate=collate)  # fmt: skip
    truth = {n: r for n, r in _bad(corpus).items() if n not in left_out}
    check(epochs, truth, lambda f: source[f.rsplit(":", 1)[1]])


# ------------------------------------------------------------------------------- video
def test_video_corpus_in_a_folder_and_in_shards_resumed_mid_epoch(tmp_path):
    pytest.importorskip("torchcodec")
    from unipred.tasks.video.data import (
        ClipTransform,
        VideoFolder,
        VideoShardDataset,
        list_videos,
    )
    from unipred.tasks.video.pack import pack_videos

    corpus = video_corpus(tmp_path / "src")  # 8 clips: 4 skipped
    tf = ClipTransform(size=8, scale=1.0, train=True)
    epochs = epochs_with_a_preemption(
        lambda c: VideoFolder(tmp_path / "src", 4, 1, tf, counter=c), stop_after=1
    )
    check(epochs, _bad(corpus), lambda f: Path(f).name)
    # packed in folder order without checks: key n is the n-th clip, every file in the shards
    pack_videos(tmp_path / "src", tmp_path / "shards", shard_size=3, seed=-1, check=False)
    order = [p.name for p, _ in list_videos(tmp_path / "src")[0]]
    epochs = epochs_with_a_preemption(
        lambda c: VideoShardDataset(str(tmp_path / "shards"), 4, 1, tf, shuffle_buffer=2,
                                    counter=c), bs=1, workers=1, stop_after=2)  # fmt: skip
    check(epochs, _bad(corpus), lambda f: order[int(f.rsplit(":", 1)[1])])


# ----------------------------------------------------------------------------- packer
def test_the_packers_summary_is_what_the_shards_hold(tmp_path, capsys):
    from unipred.data.cli import main

    corpus = image_corpus(tmp_path / "tree")
    assert main(["pack-images", str(tmp_path / "tree"), str(tmp_path / "shards"),
                 "--workers", "1", "--max-per-shard", "7"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    stems = []
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            stems += [m.name.split(".")[0].split("_", 1)[1] for m in tf if m.name.endswith(".cls")]
    skipped = {Path(p).stem for p, r in corpus.items() if r and r.startswith("skipped/")}
    converted = Counter(r.split("/")[1] for r in corpus.values() if r and r.startswith("conv"))
    assert sorted(stems) == sorted(Path(p).stem for p in corpus if Path(p).stem not in skipped)
    assert meta["num_samples"] == len(stems) == len(corpus) - len(skipped)
    assert sum(meta["left_out"].values()) == len(skipped) == 6  # the bombs and empty included
    assert meta["kept_for_conversion"] == dict(converted)
    assert f"left out {len(skipped)} bad images" in out
    assert f"kept for conversion at read time: {sum(converted.values())} images" in out


# ------------------------------------------------------------------- a real preemption
class _Sigterm(L.Callback):
    """Send this process SIGTERM once ``at`` optimizer steps are done (workers prefetch
    ahead, so the checkpoint is taken with more decoded than consumed)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


PRE = ["task=image_pretrain", "model.name=nepa_debug", "trainer.progress_bar=false",
       "trainer.loggers=[]", "trainer.accelerator=cpu", "data.aug.img_size=16",
       "trainer.global_batch=4", "trainer.max_epochs=2", "data.num_workers=2",
       "ema.enabled=false", "trainer.collapse_every_n_steps=0", "trainer.threads=1",
       "data.max_bad_fraction=1", "trainer.ckpt_every_n_steps=0"]  # fmt: skip


def test_sigterm_and_resume_inside_a_bad_folder_report_exact_counts(tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from unipred.train.config import load_config
    from unipred.train.engine import fit

    corpus = image_corpus(tmp_path / "tree")  # 24 files, 6 steps per epoch
    over = [*PRE, f"data.root={tmp_path / 'tree'}", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(SIGTERMException):
        fit(load_config(None, over), callbacks=[_Sigterm(2)])
    assert not (tmp_path / "run" / "data_report.json").exists()  # epoch 0 was not finished
    trainer = fit(load_config(None, [*over, "resume=auto"]))
    assert trainer.global_step == 12
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1]
    truth = _bad(corpus)
    for e in rep["epochs"]:
        assert {k: v for k, v in e["counts"].items() if v and "total" not in k} == dict(
            Counter(truth.values())
        )
        assert sorted((b["reason"], Path(b["file"]).name) for b in e["bad_files"]) == sorted(
            (r, f) for f, r in truth.items()
        )
    assert rep["total"]["skipped/total"] == 12 and rep["total"]["converted/total"] == 8
