"""A corpus of broken inputs mixed into real data: every file is counted under the right
reason, training goes on, nothing hangs, and the counts (summed over DataLoader workers and
DDP ranks) and the names of the bad files reach RUN_DIR/data_report.json."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from unipred.tasks.image.data import ImageFolderDataset, ShardDataset

from unipred.data.accounting import BadSampleCounter
from unipred.train.config import load_config
from unipred.train.engine import fit


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height RGB, with a few bytes of data."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


# file name -> the reason it must be counted under (None: a good image)
BAD_IMAGES = {
    "truncated.jpg": "skipped/truncated",
    "zero.jpg": "skipped/empty",
    "text.jpg": "skipped/corrupt",
    "tiny_3x2.png": "skipped/tiny",
    "bomb_60000.png": "skipped/too_large",  # header 60000 x 60000: refused by PIL while opening
    "bomb_12000.png": "skipped/too_large",  # 144 MPixel: PIL would only warn and decode it
    "cmyk.jpg": "converted/cmyk",
    "sixteen_bit.png": "converted/high_bit_depth",
    "palette.png": "converted/palette_or_alpha",
    "alpha.png": "converted/palette_or_alpha",
}


def image_corpus(root: Path, n_good: int = 14) -> dict[str, str | None]:
    """root/c0, root/c1: n_good noise JPEGs plus every file of BAD_IMAGES, spread over both
    class folders. Returns {relative path: expected reason or None}."""
    rng = np.random.default_rng(0)
    out = {}
    for c in (0, 1):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        rel = f"c{i % 2}/good{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8)).save(root / rel)
        out[rel] = None
    good = (root / "c0/good00.jpg").read_bytes()
    src = Image.open(root / "c0/good00.jpg")
    writers = {
        "truncated.jpg": lambda p: p.write_bytes(good[: len(good) // 2]),
        "zero.jpg": lambda p: p.write_bytes(b""),
        "text.jpg": lambda p: p.write_text("this is not an image\n" * 20),
        "tiny_3x2.png": lambda p: Image.new("RGB", (3, 2), (9, 9, 9)).save(p),
        "bomb_60000.png": lambda p: p.write_bytes(_png_header_only(60000, 60000)),
        "bomb_12000.png": lambda p: p.write_bytes(_png_header_only(12000, 12000)),
        "cmyk.jpg": lambda p: src.convert("CMYK").save(p),
        "sixteen_bit.png": lambda p: Image.fromarray(
            rng.integers(0, 65535, (24, 28), dtype=np.uint16)
        ).save(p),
        "palette.png": lambda p: src.convert("P").save(p),
        "alpha.png": lambda p: src.convert("RGBA").save(p),
    }
    for i, (name, reason) in enumerate(BAD_IMAGES.items()):
        rel = f"c{i % 2}/{name}"
        writers[name](root / rel)
        out[rel] = reason
    return out


def expected_counts(corpus, epochs=1) -> dict[str, int]:
    c = Counter(r for r in corpus.values() if r)
    return {k: v * epochs for k, v in c.items()}


def _nonzero(snap):
    return {k: v for k, v in snap.items() if v and not k.endswith("/total")}


def test_image_corpus_in_a_folder_through_dataloader_workers(tmp_path):
    corpus = image_corpus(tmp_path / "tree")
    counter = BadSampleCounter()
    ds = ImageFolderDataset(str(tmp_path / "tree"), transform=lambda im: np.asarray(im).shape,
                            counter=counter)  # fmt: skip
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, timeout=120)
    n = sum(len(labels) for _, labels in dl)
    assert n == len(corpus)  # bad files replaced by good ones: batches stay full
    assert _nonzero(counter.snapshot()) == expected_counts(corpus)
    named = {(b["reason"], os.path.basename(b["file"])) for b in counter.bad_files()}
    assert named == {(r, Path(p).name) for p, r in corpus.items() if r}


def test_image_corpus_in_shards_through_dataloader_workers(tmp_path):
    from unipred.data.cli import main

    corpus = image_corpus(tmp_path / "tree")
    # --no-verify: the packer keeps every file, so the broken ones reach the shard reader
    assert main(["pack-images", str(tmp_path / "tree"), str(tmp_path / "shards"),
                 "--workers", "1", "--no-verify", "--max-per-shard", "5"]) == 0  # fmt: skip
    counter = BadSampleCounter()
    ds = ShardDataset(str(tmp_path / "shards"), transform=lambda im: im.size, training=False,
                      counter=counter)  # fmt: skip
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, timeout=120)
    good = list(dl)
    n_skipped = sum(1 for r in corpus.values() if r and r.startswith("skipped/"))
    assert len(good) == len(corpus) - n_skipped
    assert _nonzero(counter.snapshot()) == expected_counts(corpus)


def _report(run_dir):
    return json.loads((Path(run_dir) / "data_report.json").read_text())


# a quarter of the corpus is broken, above the default data.max_bad_fraction: go on
PRE = ["task=image_pretrain", "model.name=nepa_debug", "trainer.progress_bar=false",
       "trainer.loggers=[]", "trainer.accelerator=cpu", "data.aug.img_size=16",
       "trainer.global_batch=8", "trainer.max_epochs=2", "data.num_workers=2",
       "ema.enabled=false", "trainer.collapse_every_n_steps=0",
       "data.max_bad_fraction=1"]  # fmt: skip


@pytest.mark.slow  # two epochs with two workers: ~19 s on a loaded 2-core box
def test_pretraining_on_the_corpus_writes_a_data_report(tmp_path):
    corpus = image_corpus(tmp_path / "tree")  # 24 files: 3 global batches per epoch
    trainer = fit(load_config(None, [*PRE, f"data.root={tmp_path / 'tree'}",
                                     f"run_dir={tmp_path / 'run'}"]))  # fmt: skip
    assert trainer.global_step == 6
    rep = _report(tmp_path / "run")
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1]
    for e in rep["epochs"]:
        assert {k: v for k, v in e["counts"].items() if v and "total" not in k} == (
            expected_counts(corpus)
        )
        assert {(b["reason"], Path(b["file"]).name) for b in e["bad_files"]} == {
            (r, Path(p).name) for p, r in corpus.items() if r
        }
    assert rep["total"]["skipped/too_large"] == 4  # two bombs, two epochs
    assert float(trainer.callback_metrics["data/converted/cmyk"]) == 1


@pytest.mark.slow  # a 2-process DDP run (gloo): ~40 s on a loaded 2-core box
def test_counts_are_summed_over_ranks_without_sync_warnings(tmp_path):
    from unipred.data.loader import EpochSampler

    corpus = image_corpus(tmp_path / "tree")
    # rank 1 reads bad files in both epochs, so rank 0's counts alone would fall short
    files = sorted(corpus)  # ImageFolder order: class folder, then file name
    for epoch in (0, 1):
        sampler = EpochSampler(len(files), 2, 1, 12, seed=1337)
        sampler.set_epoch(epoch)
        assert any(corpus[files[i]] for i in sampler)
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unipred.cli", "fit", *PRE, f"data.root={tmp_path / 'tree'}",
           f"run_dir={tmp_path / 'run'}", "trainer.devices=2", "trainer.strategy=ddp",
           "seed=1337"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sync_dist" not in proc.stderr and "sync_dist" not in proc.stdout
    rep = _report(tmp_path / "run")
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1]
    for e in rep["epochs"]:
        assert {k: v for k, v in e["counts"].items() if v and "total" not in k} == (
            expected_counts(corpus)
        )
        assert {Path(b["file"]).name for b in e["bad_files"]} == {
            Path(p).name for p, r in corpus.items() if r
        }


# --------------------------------------------------------------------------------- audio
def audio_corpus(root: Path, n_good: int = 6) -> dict[str, str | None]:
    """root/{a,b}/: good 16 kHz tones plus broken or odd clips -> {relative path: reason}."""
    from torchcodec.encoders import AudioEncoder
    from unipred.tasks.audio.spoken_digits import write_wav

    def tone(rate, seconds=0.5, amp=0.3):
        t = torch.arange(int(rate * seconds)) / rate
        return amp * torch.sin(2 * torch.pi * 440 * t)

    out = {}
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        rel = f"{'ab'[i % 2]}/good{i}.wav"
        write_wav(root / rel, tone(16000))
        out[rel] = None
    good = (root / "a/good0.wav").read_bytes()
    bad = {
        "a/truncated.wav": ("skipped/truncated", lambda p: p.write_bytes(good[: len(good) // 2])),
        "b/zero.wav": ("skipped/empty", lambda p: p.write_bytes(b"")),
        "a/text.wav": ("skipped/corrupt", lambda p: p.write_text("not audio\n" * 50)),
        # a WAV header declaring 0 channels
        "b/zero_channels.wav": ("skipped/corrupt", lambda p: p.write_bytes(
            good[:22] + (0).to_bytes(2, "little") + good[24:])),
        "a/flac_named.wav": ("converted/wrong_extension", lambda p: AudioEncoder(
            tone(16000)[None], sample_rate=16000).to_file(str(p.with_suffix(".flac")))
            or p.with_suffix(".flac").rename(p)),
        "b/rate_8k.wav": ("converted/resampled", lambda p: write_wav(p, tone(8000), 8000)),
        "a/rate_96k.wav": ("converted/resampled", lambda p: write_wav(p, tone(96000), 96000)),
        "b/silence.wav": ("converted/silent", lambda p: write_wav(p, torch.zeros(8000))),
    }  # fmt: skip
    for rel, (reason, make) in bad.items():
        make(root / rel)
        out[rel] = reason
    return out


def test_audio_corpus_in_a_folder_and_in_shards(tmp_path):
    pytest.importorskip("torchcodec")
    import argparse

    from unipred.tasks.audio.data import (
        AudioShardDataset,
        ClipTransform,
        audio_dataset,
        pad_collate,
    )
    from unipred.tasks.audio.pack import add_arguments, pack_audio

    corpus = audio_corpus(tmp_path / "src")
    tf = ClipTransform(16000, 0.5, 0.5)
    counter = BadSampleCounter()
    ds = audio_dataset(str(tmp_path / "src"), tf, counter=counter)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=pad_collate,
                                     timeout=120)  # fmt: skip
    assert sum(len(labels) for _, labels in dl) == len(corpus)  # substitutes keep batches full
    assert _nonzero(counter.snapshot()) == expected_counts(corpus)
    assert {(b["reason"], Path(b["file"]).name) for b in counter.bad_files()} == {
        (r, Path(p).name) for p, r in corpus.items() if r
    }
    # shards keeping the original bytes: the same files reach the shard reader
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(tmp_path / "src"), str(tmp_path / "shards"), "--keep-original",
                         "--shard-size", "4", "--stats-clips", "0"])  # fmt: skip
    meta = pack_audio(args)
    packed = {Path(s.split(": ")[0]).name for s in meta["skipped"]}
    counter = BadSampleCounter()
    sds = AudioShardDataset(str(tmp_path / "shards"), ClipTransform(16000, 0.5, 0.5, False),
                            counter=counter)  # fmt: skip
    list(torch.utils.data.DataLoader(sds, batch_size=None, num_workers=2, timeout=120))
    want = {k: v for k, v in expected_counts(
        {p_: r for p_, r in corpus.items() if not any(p_.endswith(n) for n in packed)}).items()}  # fmt: skip
    got = _nonzero(counter.snapshot())
    # the packer decodes every clip and leaves out the undecodable ones (listed in meta.json);
    # of the rest, each is counted by the reader under its reason
    assert got == want, (got, want, packed)


# --------------------------------------------------------------------------------- video
def video_corpus(root: Path, n_good: int = 4) -> dict[str, str | None]:
    """root/{a,b}/: n_good tiny mp4s plus a truncated, a zero-byte, a zero-frame and an
    audio-only mp4 -> {relative path: reason}."""
    from torchcodec.encoders import AudioEncoder
    from unipred.tasks.video.data import write_video

    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    corpus = {}
    for i in range(n_good):
        rel = f"{'ab'[i % 2]}/good{i}.mp4"
        write_video(root / rel, torch.full((8, 3, 16, 16), 30 * i, dtype=torch.uint8))
        corpus[rel] = None
    good = (root / "a/good0.mp4").read_bytes()
    (root / "a/truncated.mp4").write_bytes(good[: len(good) // 2])
    corpus["a/truncated.mp4"] = "skipped/corrupt"  # its index (moov) is cut off: unreadable
    (root / "b/zero.mp4").write_bytes(b"")
    corpus["b/zero.mp4"] = "skipped/empty"
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "color=c=black:s=16x16:r=8", "-frames:v", "0", "-c:v", "libx264",
                    str(root / "a/zero_frames.mp4")], check=True, timeout=60)  # fmt: skip
    # a video stream without a frame: FFmpeg cannot index it, exactly as a file cut before its
    # index; the decoder tells the two apart by no other sign, so both count as corrupt
    corpus["a/zero_frames.mp4"] = "skipped/corrupt"
    AudioEncoder(torch.zeros(1, 8000), sample_rate=16000).to_file(str(root / "b/audio_only.mp4"))
    corpus["b/audio_only.mp4"] = "skipped/empty"  # no video stream
    return corpus


def test_video_corpus_in_a_folder_and_in_shards(tmp_path):
    pytest.importorskip("torchcodec")
    from unipred.tasks.video.data import ClipTransform, VideoFolder, VideoShardDataset
    from unipred.tasks.video.pack import pack_videos

    root = tmp_path / "src"
    corpus = video_corpus(root)
    counter = BadSampleCounter()
    ds = VideoFolder(root, 4, 1, ClipTransform(size=8, scale=1.0), counter=counter)
    assert len(ds) == len(corpus)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, timeout=120)
    assert sum(len(labels) for _, labels in dl) == len(corpus)
    assert _nonzero(counter.snapshot()) == expected_counts(corpus)
    # packed without checking, every file reaches the shard reader
    pack_videos(root, tmp_path / "shards", shard_size=3, check=False)
    counter = BadSampleCounter()
    sds = VideoShardDataset(str(tmp_path / "shards"), 4, 1, ClipTransform(size=8, scale=1.0),
                            counter=counter)  # fmt: skip
    got = list(torch.utils.data.DataLoader(sds, batch_size=None, num_workers=2, timeout=120))
    assert len(got) == 4
    assert _nonzero(counter.snapshot()) == expected_counts(corpus)


def test_a_training_set_smaller_than_one_global_batch_says_what_to_set():
    """A recipe written for a large batch (the B/14 one: 4096) on a small folder: one line
    naming the sizes and the key that fixes it."""
    from unipred.data.loader import build_loader

    with pytest.raises(ValueError, match=r"has 90 samples.*set trainer.global_batch to at most 90"):
        build_loader(list(range(90)), 32, 1, 0, 128, 0, train=True, num_workers=0)
