"""Video path: tubelet tokenizer, image->video inflation, decoding real files, shards, 3-D RoPE."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from unipred.tasks.video.data import (
    ClipTransform,
    VideoFolder,
    VideoShardDataset,
    decode_video,
    encode_frames_jpeg,
    frame_indices,
    list_videos,
    write_video,
)
from unipred.tokenizers.image import ImageTokenizer
from unipred.tokenizers.video import (
    VideoTokenizer,
    inflate_image_state_dict,
    inflate_patch_kernel,
)

from unipred.data.accounting import BadSampleCounter
from unipred.nn.model import NEPA, model_config
from unipred.nn.rope import grid_coords


def _codec_works() -> bool:
    """torchcodec needs FFmpeg's shared libraries (Debian: apt-get install ffmpeg)."""
    try:
        from torchcodec.encoders import VideoEncoder

        VideoEncoder(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), frame_rate=2).to_tensor("mp4")
        return True
    except Exception:
        return False


needs_codec = pytest.mark.skipif(
    not _codec_works(), reason="FFmpeg libraries missing (apt-get install ffmpeg)"
)


# ------------------------------------------------------------------------------ tokenizer
def test_tubelet_shapes_order_and_coords():
    tok = VideoTokenizer(dim=4, patch_size=4, tubelet_size=2, in_chans=1)
    n_t, n_h, n_w = 3, 2, 5
    # every tubelet holds one constant value: its index in time-major (t, y, x) raster order
    ids = torch.arange(n_t * n_h * n_w, dtype=torch.float32).view(n_t, n_h, n_w)
    x = ids.repeat_interleave(2, 0).repeat_interleave(4, 1).repeat_interleave(4, 2)
    x = x[None, None].expand(2, 1, -1, -1, -1)  # (B=2, C=1, T=6, H=8, W=20)
    with torch.no_grad():
        tok.proj.weight.fill_(1.0 / (2 * 4 * 4))  # mean over the tubelet
        tok.proj.bias.zero_()
    out = tok(x)
    assert out.tokens.shape == (2, n_t * n_h * n_w, 4)
    assert torch.allclose(out.tokens[0, :, 0], ids.flatten(), atol=1e-4)
    assert tok.coord_dims == 3 and out.coords.shape == (n_t * n_h * n_w, 3)
    assert torch.equal(out.coords, grid_coords(n_t, n_h, n_w))
    # time is the slowest axis: the first n_h*n_w tokens share the earliest t
    assert (out.coords[: n_h * n_w, 0] == out.coords[0, 0]).all()
    assert out.coords[n_h * n_w, 0] > out.coords[0, 0]


def test_tokenizer_rejects_bad_shapes():
    tok = VideoTokenizer(dim=4, patch_size=4, tubelet_size=2)
    with pytest.raises(ValueError, match="tubelets"):
        tok(torch.zeros(1, 3, 3, 8, 8))  # 3 frames do not split into tubelets of 2
    with pytest.raises(ValueError, match="expects"):
        tok(torch.zeros(1, 1, 2, 8, 8))


def test_inflation_preserves_static_video_response():
    torch.manual_seed(0)
    img_tok = ImageTokenizer(dim=16, patch_size=4)
    vid_tok = VideoTokenizer(dim=16, patch_size=4, tubelet_size=2)
    vid_tok.load_image_weights(img_tok.proj.weight, img_tok.proj.bias)
    image = torch.randn(2, 3, 8, 12)
    static = image.unsqueeze(2).expand(-1, -1, 4, -1, -1)  # 4 identical frames
    img_out = img_tok(image).tokens  # (B, 6, D)
    vid_out = vid_tok(static).tokens  # (B, 2 * 6, D)
    assert torch.allclose(vid_out[:, :6], img_out, atol=1e-5)
    assert torch.allclose(vid_out[:, 6:], img_out, atol=1e-5)
    # a 4-D image batch is a static clip too
    assert torch.allclose(vid_tok(image).tokens, img_out, atol=1e-5)
    # a not-inflated (merely repeated) kernel would double the response: the test can fail
    k = inflate_patch_kernel(img_tok.proj.weight, 2)
    assert torch.allclose(k.sum(2), img_tok.proj.weight, atol=1e-6)


def test_image_nepa_state_dict_loads_into_video_nepa():
    img = NEPA(model_config("nepa_debug"))
    vid = NEPA(model_config("nepa_debug", tokenizer="video",
                            tokenizer_args={"patch_size": 4, "tubelet_size": 2}))  # fmt: skip
    state = inflate_image_state_dict(img.state_dict(), tubelet_size=2)
    vid.load_state_dict(state, strict=True)
    assert vid.predictor.cfg.coord_dims == 3
    w = vid.tokenizer.proj.weight
    assert w.shape[2] == 2 and torch.allclose(w.sum(2), img.tokenizer.proj.weight, atol=1e-6)


def test_inflate_checkpoint_feeds_model_init(tmp_path):
    from unipred.tokenizers.video import inflate_checkpoint

    from unipred.train.checkpoint import apply_init

    img = NEPA(model_config("nepa_debug"))
    src = tmp_path / "image.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in img.state_dict().items()}}, src)
    spec = inflate_checkpoint(str(src), str(tmp_path / "video.ckpt"), tubelet_size=2)
    vid = NEPA(model_config("nepa_video_debug", head="mean", num_classes=3, causal=False))
    apply_init(vid, spec)
    assert torch.allclose(vid.tokenizer.proj.weight.sum(2), img.tokenizer.proj.weight, atol=1e-6)
    assert torch.equal(vid.cls_token, img.cls_token)


@pytest.mark.parametrize("causal", [True, False])
def test_3d_rope_forward_backward(causal):
    torch.manual_seed(0)
    cfg = model_config("nepa_debug", tokenizer="video", causal=causal,
                       tokenizer_args={"patch_size": 4, "tubelet_size": 2})  # fmt: skip
    model = NEPA(cfg)
    model.train()
    out = model(torch.randn(2, 3, 4, 8, 8))
    assert out.predictions.shape == (2, 1 + 2 * 2 * 2, cfg.predictor.dim)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    g = model.tokenizer.proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    cls = NEPA(model_config("nepa_debug", tokenizer="video", head="mean", num_classes=3,
                            tokenizer_args={"patch_size": 4, "tubelet_size": 2}))  # fmt: skip
    logits = cls(torch.randn(2, 3, 4, 8, 8)).logits
    logits.sum().backward()
    assert logits.shape == (2, 3)


# ------------------------------------------------------------------------------- decoding
def _ramp(n_frames=12, size=32) -> torch.Tensor:
    """uint8 (T, 3, H, W) whose frame t is uniformly grey at level 20 * t."""
    levels = (torch.arange(n_frames) * 20).clamp(max=255).to(torch.uint8)
    return levels.view(-1, 1, 1, 1).expand(-1, 3, size, size).contiguous()


def test_frame_indices():
    assert frame_indices(100, 4, 5, train=False) == [42, 47, 52, 57]
    rng = random.Random(0)
    for _ in range(20):
        idx = frame_indices(30, 8, 3, train=True, rng=rng)
        assert len(idx) == 8 and idx[0] >= 0 and idx[-1] < 30 and idx[1] - idx[0] == 3
    assert frame_indices(3, 4, 2, train=False) == [0, 1, 1, 2]  # short clip: spread over it
    with pytest.raises(ValueError):
        frame_indices(0, 4, 1, train=False)


@needs_codec
@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_decode_real_file(tmp_path, ext):
    path = tmp_path / f"ramp.{ext}"
    write_video(path, _ramp())
    clip = decode_video(str(path), num_frames=4, stride=2, train=False)
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.uint8
    # centred: 12 frames, span 7 -> start 2 -> frames 2, 4, 6, 8 at levels 40, 80, 120, 160
    means = clip.float().mean(dim=(1, 2, 3))
    assert torch.allclose(means, torch.tensor([40.0, 80.0, 120.0, 160.0]), atol=4.0)
    from_bytes = decode_video(path.read_bytes(), num_frames=4, stride=2, train=False)
    assert torch.equal(from_bytes, clip)


def _make_tree(root, corrupt=True):
    """root/{left,right}/*.mp4 plus a frame folder; one corrupt mp4 when asked."""
    (root / "left").mkdir(parents=True)
    (root / "right").mkdir()
    write_video(root / "left" / "a.mp4", _ramp())
    write_video(root / "right" / "b.webm", _ramp())
    frames = root / "right" / "c_frames"
    frames.mkdir()
    for i, jpg in enumerate(encode_frames_jpeg(_ramp(6))):
        (frames / f"{i:04d}.jpg").write_bytes(jpg)
    if corrupt:
        (root / "left" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)


@needs_codec
def test_folder_reader_skips_and_counts_corrupt(tmp_path):
    _make_tree(tmp_path)
    samples, classes = list_videos(tmp_path)
    assert classes == ["left", "right"] and len(samples) == 4
    counter = BadSampleCounter()
    ds = VideoFolder(tmp_path, 4, 1, ClipTransform(size=16, scale=1.0), counter=counter)
    items = [ds[i] for i in range(len(ds))]  # must not raise
    assert counter.snapshot()["skipped/corrupt"] == 1
    for clip, label in items:
        assert clip.shape == (3, 4, 16, 16) and label in (0, 1)
    frame_clip = next(c for (p, _), (c, _) in zip(samples, items) if p.name == "c_frames")
    assert torch.isfinite(frame_clip).all()


@needs_codec
def test_csv_labels(tmp_path):
    _make_tree(tmp_path, corrupt=False)
    (tmp_path / "list.csv").write_text("path,label\nleft/a.mp4,run\nright/b.webm,jump\n")
    samples, classes = list_videos(tmp_path / "list.csv")
    assert classes == ["jump", "run"] and [lab for _, lab in samples] == [1, 0]


@needs_codec
def test_pack_and_stream_shards(tmp_path):
    from unipred.tasks.video.pack import pack_videos

    _make_tree(tmp_path / "src")
    meta = pack_videos(tmp_path / "src", tmp_path / "shards", shard_size=2, seed=0)
    assert meta["num_samples"] == 3 and len(meta["skipped"]) == 1  # the corrupt mp4
    assert meta["num_shards"] == 2
    counter = BadSampleCounter()
    ds = VideoShardDataset(str(tmp_path / "shards"), 4, 1, ClipTransform(size=16, scale=1.0),
                           counter=counter)  # fmt: skip
    items = list(ds)
    assert sorted(lab for _, lab in items) == [0, 1, 1]
    assert all(c.shape == (3, 4, 16, 16) for c, _ in items)
    # packed without checking, the corrupt clip reaches the reader, which skips and counts it
    pack_videos(tmp_path / "src", tmp_path / "raw", shard_size=10, check=False)
    counter = BadSampleCounter()
    ds = VideoShardDataset(str(tmp_path / "raw"), 4, 1, ClipTransform(size=16, scale=1.0),
                           counter=counter)  # fmt: skip
    assert len(list(ds)) == 3 and counter.snapshot()["skipped/corrupt"] == 1


@needs_codec
def test_pack_video_cli(tmp_path, capsys):
    from unipred.data.cli import main

    _make_tree(tmp_path / "src")
    assert main(["pack-video", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "packed 3 clips" in out and "skipped 1" in out and "data.root=" in out


@needs_codec
def test_engine_classifies_real_files(tmp_path):
    """video_classify through the engine on real mp4/webm files and a frame folder."""
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    _make_tree(tmp_path / "data")
    over = ["task=video_classify", "model.name=nepa_video_debug", f"run_dir={tmp_path / 'run'}",
            f"data.root={tmp_path / 'data'}", f"data.val_root={tmp_path / 'data'}",
            "data.num_classes=2", "data.image_size=16", "data.num_frames=4", "data.frame_stride=2",
            "data.resize_scale=1.0", "data.num_workers=0", "trainer.global_batch=2",
            "trainer.accelerator=cpu", "trainer.fast_dev_run=2", "trainer.progress_bar=false",
            "trainer.loggers=[]"]  # fmt: skip
    trainer = fit(load_config(None, over))
    assert trainer.global_step == 2
    assert 0.0 <= float(trainer.callback_metrics["val/acc1"]) <= 1.0


def test_demo_probe_reads_the_backbone_with_its_pretraining_attention():
    """video/demo_probe: the demo's model with causal attention (as video/demo_pretrain trains
    it; video/demo_classify fine-tunes bidirectionally), a frozen probe, the read-out of every
    token of its 4 x 4 x 4 tubelet grid and the cross-validated linear-probe lr."""
    from unipred.train.config import load_config

    pre, cls, probe = (load_config(f"video/{n}", check_paths=False)
                       for n in ("demo_pretrain", "demo_classify", "demo_probe"))  # fmt: skip
    assert probe.model.predictor.causal is True and cls.model.predictor.causal is False
    for key in ("dim", "depth", "heads"):  # the same network as pretrained
        assert (
            getattr(probe.model.predictor, key)
            == getattr(pre.model.predictor, key)
            == getattr(cls.model.predictor, key)
        )
    assert probe.model.tokenizer_args == pre.model.tokenizer_args
    assert probe.data.mode == "probe" and probe.model.head == "probe"
    assert probe.eval_defaults == {"features": {"pool": "grid", "grid": 4},
                                   "linear": {"lr_grid": [3e-4, 1e-3, 3e-3, 1e-2]}}  # fmt: skip


def test_motion_clips_writes_the_held_out_directions(tmp_path):
    """benchmarks/motion_clips.py: 8 direction folders per split, readable clips, bad counts
    refused in one line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "motion_clips", Path(__file__).parents[1] / "benchmarks" / "motion_clips.py"
    )
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    out = tmp_path / "m"
    assert mc.main([str(out), "--pretrain", "2", "--train-per-class", "1",
                    "--test-per-class", "1"]) == 0  # fmt: skip
    for split in ("train", "val"):
        dirs = sorted(p.name for p in (out / "motion" / split).iterdir())
        assert len(dirs) == 8 and "up-left" in dirs
    assert len(list((out / "pretrain").glob("*.mp4"))) == 2
    clip = (out / "motion" / "train" / "up-left").glob("*.mp4").__next__()
    assert clip.stat().st_size > 0
    with pytest.raises(SystemExit, match="--directions 9"):
        mc.main([str(out), "--directions", "9"])
