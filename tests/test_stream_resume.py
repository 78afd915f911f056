"""Streaming resume with the shard readers the project ships (image, audio, video,
segmentation): shards made by the project's own packers, several DataLoader workers and more
shards than workers; a run is killed mid-epoch and again right after an epoch-end checkpoint,
resumed twice with resume=auto, and each epoch must have delivered every sample exactly once.

Every packed sample carries its own label (one class per sample, or a constant label map for
segmentation), so the labels in the training batches are the sample keys."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from unipred.train.config import load_config
from unipred.train.engine import fit

STEPS = 6  # optimizer steps per epoch in every run below (samples = 6 x global batch)
COMMON = ["trainer.progress_bar=false", "trainer.loggers=[]", "trainer.accelerator=cpu",
          "trainer.max_epochs=2", "trainer.ckpt_every_n_steps=4", "ema.enabled=false",
          "trainer.collapse_every_n_steps=0", "data.num_workers=3", "data.val_root=''"]  # fmt: skip


class Keys(L.Callback):
    """step -> the sample keys of the batch that made that optimizer step."""

    def __init__(self, key_fn):
        self.key_fn, self.keys = key_fn, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys[trainer.global_step] = self.key_fn(batch)


class Kill(L.Callback):
    def __init__(self, at_step):
        self.at = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("killed")  # the process dies after its step checkpoint


def _labels(batch):
    return [int(v) for v in batch[1]]


def _seg_keys(batch):
    out = []
    for lab in batch[1]:
        vals = lab[lab != 255].unique().tolist()
        assert len(vals) == 1, vals  # one constant class per packed sample
        out.append(int(vals[0]))
    return out


def interrupted_run(run_dir, over, key_fn):
    """Killed at step 5 (resumes from the step-4 checkpoint, mid-epoch 0), then at step 7
    (resumes from last.ckpt written at the end of epoch 0), then run to the end."""
    cfg = lambda *extra: load_config(None, [*COMMON, f"run_dir={run_dir}", *over, *extra])  # noqa: E731
    a, b, c = Keys(key_fn), Keys(key_fn), Keys(key_fn)
    with pytest.raises(RuntimeError, match="killed"):
        fit(cfg(), callbacks=[a, Kill(5)])
    with pytest.raises(RuntimeError, match="killed"):
        fit(cfg("resume=auto"), callbacks=[b, Kill(7)])
    fit(cfg("resume=auto"), callbacks=[c])
    assert sorted(a.keys) == [1, 2, 3, 4, 5] and sorted(b.keys) == [5, 6, 7]
    assert sorted(c.keys) == list(range(STEPS + 1, 2 * STEPS + 1))
    # what the checkpoints had recorded: steps 1-4 from run a, 5-6 from run b, the rest from c
    merged = {**{k: v for k, v in a.keys.items() if k <= 4},
              **{k: v for k, v in b.keys.items() if k <= STEPS}, **c.keys}  # fmt: skip
    return merged


def check_epochs(merged, n):
    for e in range(2):
        seen = [k for s in range(e * STEPS + 1, (e + 1) * STEPS + 1) for k in merged[s]]
        assert sorted(seen) == list(range(n)), f"epoch {e}: repeated or lost samples"
    first = [k for s in range(1, STEPS + 1) for k in merged[s]]
    second = [k for s in range(STEPS + 1, 2 * STEPS + 1) for k in merged[s]]
    assert first != second  # reshuffled per epoch


# --------------------------------------------------------------------------------- image
def _image_shards(tmp_path, n):
    from unipred.data.cli import main

    rng = np.random.default_rng(0)
    for i in range(n):  # one class folder per image: the label is the sample key
        d = tmp_path / "src" / f"c{i:03d}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / "x.jpg")
    out = tmp_path / "shards"
    assert main(["pack-images", str(tmp_path / "src"), str(out), "--workers", "1",
                 "--max-per-shard", "4"]) == 0  # fmt: skip
    assert len(list(out.glob("*.tar"))) == n // 4  # 12 shards for 3 workers
    return out


def test_loader_resumes_a_shard_stream_mid_epoch(tmp_path):
    """The loader and the shard reader alone (no trainer): 3 workers, 12 shards; 4 of 6
    batches consumed, the position saved, a new loader resumes: every sample once."""
    from unipred.tasks.image.data import ShardDataset

    from unipred.data.loader import build_loader

    shards = _image_shards(tmp_path, 48)

    def loader():
        ds = ShardDataset(str(shards), transform=lambda im: 0, seed=3, shuffle_buffer=16)
        return build_loader(ds, 8, 1, 0, 1, seed=3, train=True, num_workers=3)

    first = loader()
    first.dataset.set_epoch(1)
    seen = []
    for i, (_, labels) in enumerate(first):
        if i == 4:
            break
        first.mark_consumed(1)
        seen += labels.tolist()
    state = first.state_dict()
    assert state["consumed_batches"] == 4
    second = loader()
    second.load_state_dict(state)
    rest = [k for _, labels in second for k in labels.tolist()]
    assert len(rest) == 16 and sorted(seen + rest) == list(range(48))


@pytest.mark.slow  # four tiny runs with 3 workers each: ~30 s on a loaded 2-core box
def test_image_shards_resume_exactly(tmp_path):
    n = 8 * STEPS
    shards = _image_shards(tmp_path, n)
    over = ["task=image_pretrain", "model.name=nepa_debug", f"data.root={shards}",
            "data.aug.img_size=16", "trainer.global_batch=8", "model.predictor.drop_path=0"]  # fmt: skip
    merged = interrupted_run(tmp_path / "cut", over, _labels)
    check_epochs(merged, n)
    # and the order is the uninterrupted run's, batch for batch
    full = Keys(_labels)
    fit(load_config(None, [*COMMON, f"run_dir={tmp_path / 'full'}", *over]), callbacks=[full])
    assert merged == full.keys


def test_every_shard_reader_is_a_resumable_stream(tmp_path):
    """The loader checks the contract structurally; a bad call names its arguments."""
    from unipred.tasks.audio.data import AudioShardDataset
    from unipred.tasks.image.data import ShardDataset
    from unipred.tasks.image.seg_data import SegShardDataset
    from unipred.tasks.video.data import VideoShardDataset

    from unipred.data.loader import ResumableStream

    for cls in (ShardDataset, AudioShardDataset, VideoShardDataset, SegShardDataset):
        assert issubclass(cls, ResumableStream), cls
    shards = _image_shards(tmp_path, 8)
    ds = ShardDataset(str(shards))
    with pytest.raises(ValueError, match="batch_size=0"):
        ds.resume(3, 0)


# --------------------------------------------------------------------------------- audio
@pytest.mark.slow  # three runs with 3 workers each: ~30 s on a loaded 2-core box
def test_audio_shards_resume_exactly(tmp_path):
    pytest.importorskip("torchcodec")
    from unipred.tasks.audio.pack import add_arguments, pack_audio
    from unipred.tasks.audio.spoken_digits import write_wav

    n, sr = 4 * STEPS, 16000
    for i in range(n):
        (tmp_path / "src" / f"c{i:03d}").mkdir(parents=True)
        t = torch.arange(sr // 2) / sr
        write_wav(
            tmp_path / "src" / f"c{i:03d}" / "x.wav",
            0.3 * torch.sin(2 * 3.1416 * (200 + 20 * i) * t),
        )
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    meta = pack_audio(p.parse_args([str(tmp_path / "src"), str(tmp_path / "shards"),
                                    "--shard-size", "2", "--stats-clips", "4"]))  # fmt: skip
    assert meta["num_samples"] == n and meta["num_shards"] == n // 2
    over = ["task=audio_pretrain", "model.name=nepa_audio_debug",
            f"data.root={tmp_path / 'shards'}", "data.max_seconds=0.5", "data.min_seconds=0.5",
            "trainer.global_batch=4"]  # fmt: skip
    check_epochs(interrupted_run(tmp_path / "cut", over, _labels), n)


# --------------------------------------------------------------------------------- video
@pytest.mark.slow  # three runs with 3 workers each: ~30 s on a loaded 2-core box
def test_video_shards_resume_exactly(tmp_path):
    pytest.importorskip("torchcodec")
    from unipred.tasks.video.data import write_video
    from unipred.tasks.video.pack import pack_videos

    n = 4 * STEPS
    for i in range(n):
        d = tmp_path / "src" / f"c{i:03d}"
        d.mkdir(parents=True)
        frames = torch.full((6, 3, 16, 16), 10 * i % 256, dtype=torch.uint8)
        write_video(d / "x.mp4", frames, preset="ultrafast")
    meta = pack_videos(tmp_path / "src", tmp_path / "shards", shard_size=2, seed=0)
    assert meta["num_samples"] == n and meta["num_shards"] == n // 2
    over = ["task=video_pretrain", "model.name=nepa_video_debug",
            f"data.root={tmp_path / 'shards'}", "data.image_size=8", "data.num_frames=4",
            "data.frame_stride=1", "data.resize_scale=1.0", "trainer.global_batch=4"]  # fmt: skip
    check_epochs(interrupted_run(tmp_path / "cut", over, _labels), n)


# -------------------------------------------------------------------------- segmentation
@pytest.mark.slow  # three runs with 3 workers each: ~30 s on a loaded 2-core box
def test_segmentation_shards_resume_exactly(tmp_path):
    from unipred.tasks.image.seg_data import pack_split
    from unipred.tasks.image.segment import SegmentADE20K

    n = 4 * STEPS
    src = tmp_path / "ade"
    (src / "images/training").mkdir(parents=True)
    (src / "annotations/training").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # label map: constant class i + 1 (i after reduce_zero_label)
        name = f"ADE_training_{i:08d}"
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            src / "images/training" / f"{name}.jpg"
        )
        lab = np.full((24, 32), i + 1, dtype=np.uint8)
        Image.fromarray(lab, mode="L").save(src / "annotations/training" / f"{name}.png")
    assert pack_split(src, tmp_path / "shards", "training", shard_size=2) == n
    over = [f"{k}={v}" for k, v in SegmentADE20K.smoke_config().items()]
    over += ["task=segment_ade20k", f"data.root={tmp_path / 'shards/training'}",
             "data.aug.crop_size=16", "data.aug.img_scale=[32,24]",
             "data.num_workers=3"]  # fmt: skip
    check_epochs(interrupted_run(tmp_path / "cut", over, _seg_keys), n)
