"""Exact resume with 2 DataLoader workers and random augmentation on the shipped audio and
video folder readers and on joint pretraining (tests/test_exact_resume.py covers images,
folders and shards, and the signals): stopped one step after a mid-epoch checkpoint, then
resume=auto gives the uninterrupted run's batches and bit-identical weights, EMA and
optimizer state."""

from __future__ import annotations

import importlib.util
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unipred.train.config import load_config
from unipred.train.engine import fit


def _sibling(name: str):
    """A helper module next to this file (test modules are not importable by name here)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the batch digest, stop callback and state comparison of tests/test_exact_resume.py
_kit = _sibling("test_exact_resume")
digest, Batches, Stop = _kit.digest, _kit.Batches, _kit.Stop
final, assert_same_state = _kit.final, _kit.assert_same_state


COMMON = ["trainer.progress_bar=false", "trainer.loggers=[]", "trainer.precision=32-true",
          "trainer.collapse_every_n_steps=0", "trainer.threads=1", "ema.enabled=true",
          "ema.decay=0.9", "data.num_workers=2", "trainer.max_steps=7",
          "trainer.ckpt_every_n_steps=5", "trainer.max_epochs=-1"]  # fmt: skip


def audio_folder(root):
    """2 classes x 6 clips of 1.0 s (16 kHz, 16-bit WAV): tones in noise."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            t = np.arange(16000) / 16000
            x = 0.3 * np.sin(2 * np.pi * (300 + 200 * c + 10 * i) * t) + 0.05 * rng.standard_normal(
                16000
            )
            with wave.open(str(root / f"c{c}" / f"{i}.wav"), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes((x * 20000).astype("<i2").tobytes())
    return root


def video_folder(root):
    """2 classes x 6 clips, each a folder of 8 PNG frames of 20 px (a moving square)."""
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(6):
            clip = root / f"c{c}" / f"clip{i}"
            clip.mkdir(parents=True)
            base = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
            for f in range(8):
                a = base.copy()
                a[4:10, f : f + 6] = 250 if c else 120
                Image.fromarray(a).save(clip / f"{f:03d}.png")
    return root


def audio_config(tmp_path, run_dir, *over):
    root = tmp_path / "wav"
    if not root.exists():
        audio_folder(root)
    # the recipe's augmentation: a random 0.5 s crop of each clip and a random gain of +-6 dB
    return load_config("audio/digits_pretrain", [*COMMON, f"data.root={root}",
                       "data.max_seconds=0.5", "data.gain_db=6", "trainer.global_batch=4",
                       "model.predictor.dim=32", "model.predictor.depth=1",
                       "model.predictor.heads=2", "data.cache_mb=0", f"run_dir={run_dir}",
                       *over])  # fmt: skip


def video_config(tmp_path, run_dir, *over):
    root = tmp_path / "clips"
    if not root.exists():
        video_folder(root)
    # kinetics-style augmentation: random temporal offset, random crop, horizontal flip
    return load_config("video/demo_pretrain", [*COMMON, f"data.root={root}",
                       "data.num_frames=4", "data.frame_stride=1", "data.image_size=16",
                       "data.resize_scale=1.25", "data.hflip=true", "trainer.global_batch=4",
                       "model.tokenizer_args.patch_size=4", "model.predictor.depth=1",
                       f"run_dir={run_dir}", *over])  # fmt: skip


CONFIGS = {"audio": audio_config, "video": video_config}


@pytest.mark.slow  # three tiny runs with 2 workers per modality: ~40 s each
@pytest.mark.parametrize("modality", ["audio", "video"])
def test_folder_readers_resume_exactly_with_workers(tmp_path, modality):
    make = CONFIGS[modality]
    full = Batches()
    fit(make(tmp_path, tmp_path / "full"), callbacks=[full], show_recipe=False)
    assert sorted(full.seen) == list(range(1, 8))
    first = Batches()
    with pytest.raises(RuntimeError, match="killed"):
        fit(make(tmp_path, tmp_path / "cut"), callbacks=[first, Stop(5)], show_recipe=False)
    second = Batches()
    fit(make(tmp_path, tmp_path / "cut", "resume=auto"), callbacks=[second], show_recipe=False)
    assert sorted(second.seen) == [6, 7]
    assert second.seen[6][:2] == (1, 2)  # 12 clips / 4 = 3 batches: epoch 1, batch 2
    for step, want in full.seen.items():
        got = second.seen.get(step) or first.seen[step]
        assert got == want, (step, got, want)
    assert_same_state(final(tmp_path / "full"), final(tmp_path / "cut"))


def joint_config(tmp_path, run_dir, *over):
    """Joint pretraining over the audio and video folders above, their augmentations on."""
    wav, clips = tmp_path / "wav", tmp_path / "clips"
    if not wav.exists():
        audio_folder(wav)
        video_folder(clips)
    recipe = tmp_path / "joint.yaml"
    recipe.write_text(f"""
task: joint_pretrain
model:
  name: nepa_debug
  predictor: {{dim: 32, depth: 1, heads: 2, causal: true}}
data:
  space: 3
  interleave: random
  sources:
    audio:
      config: audio/digits_pretrain
      axes: [0, 1]
      data: {{root: "{wav}", max_seconds: 0.5, gain_db: 6.0, cache_mb: 0}}
    video:
      config: video/demo_pretrain
      model: {{tokenizer_args: {{patch_size: 4}}}}
      data: {{root: "{clips}", num_frames: 4, frame_stride: 1, image_size: 16,
              resize_scale: 1.25, hflip: true}}
trainer: {{global_batch: 4, accelerator: cpu}}
""")
    return load_config(str(recipe), [*COMMON, f"run_dir={run_dir}", *over])


@pytest.mark.slow  # three tiny joint runs with 2 workers: ~50 s
def test_joint_pretraining_resumes_exactly_with_workers(tmp_path):
    full = Batches()
    fit(joint_config(tmp_path, tmp_path / "full"), callbacks=[full], show_recipe=False)
    assert sorted(full.seen) == list(range(1, 8))
    first = Batches()
    with pytest.raises(RuntimeError, match="killed"):
        fit(joint_config(tmp_path, tmp_path / "cut"), callbacks=[first, Stop(5)],
            show_recipe=False)  # fmt: skip
    second = Batches()
    fit(joint_config(tmp_path, tmp_path / "cut", "resume=auto"), callbacks=[second],
        show_recipe=False)  # fmt: skip
    assert sorted(second.seen) == [6, 7]
    for step, want in full.seen.items():
        got = second.seen.get(step) or first.seen[step]
        assert got == want, (step, got, want)
    assert_same_state(final(tmp_path / "full"), final(tmp_path / "cut"))
