"""Joint pretraining (unipred/joint.py): several sources, one predictor. Schedule and stream
positions, per-source collapse statistics, the shared RoPE space, joint -> single-modality
initialisation, exact resume with the shipped readers, config errors, DDP (2 gloo processes)."""

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from unipred.nn.predictor import Predictor, PredictorConfig
from unipred.nn.rope import lift_coords
from unipred.task.joint import JointStream, quotas, smooth_order
from unipred.train.checkpoint import CheckpointError, read_checkpoint
from unipred.train.config import ConfigError, load_config
from unipred.train.engine import LitTask, fit

FMNIST_TOK = {"in_chans": 1, "patch_size": 7}
IMAGE = {"task": "fmnist_pretrain", "weight": 2,
         "data": {"generated_samples": 32, "shift": 2, "hflip": True},
         "model": {"tokenizer_args": FMNIST_TOK}}  # fmt: skip
VIDEO = {"task": "video_pretrain", "model": {"name": "nepa_video_debug"},
         "data": {"image_size": 8, "num_frames": 4, "train_samples": 12, "val_samples": 4,
                  "num_workers": 0}}  # fmt: skip
ENGINE = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "trainer.loggers=[]",
          "model.name=nepa_debug", "trainer.global_batch=4", "ema.decay=0.9"]  # fmt: skip


def joint_cfg(run_dir, sources, *over):
    return load_config(
        None,
        ["task=joint_pretrain", f"data.sources={json.dumps(sources)}", f"run_dir={run_dir}",
         *ENGINE, *over],
    )  # fmt: skip


class Record(L.Callback):
    def __init__(self):
        self.losses, self.sources = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()
        self.sources[trainer.global_step] = batch[0]["source"]


class Kill(L.Callback):
    def __init__(self, at_step):
        self.at = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


# ------------------------------------------------------------------------- schedule / stream
def test_quotas_and_smooth_order_keep_the_weights():
    assert quotas([2, 1, 1], 8) == [4, 2, 2]
    assert sum(quotas([0.3, 0.3, 0.4], 7)) == 7
    order = smooth_order([4, 2, 2])
    assert [order.count(i) for i in range(3)] == [4, 2, 2]
    assert all(order[j] != order[j + 1] or order[j] == 0 for j in range(len(order) - 1))
    # every prefix stays within one batch of its share
    for n in range(1, len(order) + 1):
        for i, share in enumerate([0.5, 0.25, 0.25]):
            assert abs(order[:n].count(i) - share * n) <= 1


def _stream(world=1, rank=0, bs=4, batches=0, interleave="smooth", sizes=(20, 9)):
    sets = [torch.utils.data.TensorDataset(torch.arange(n)) for n in sizes]
    s = JointStream(["a", "b"], sets, [2, 1], 7, bs, batches, 1, interleave)
    s.rank, s.world = rank, world
    s.set_epoch = lambda e: setattr(s, "epoch", e)  # keep the ranks set above
    return s


def _batches(stream):
    items = list(stream)
    b = stream.batch_size
    return [
        (items[i][0], [int(x[0]) for _, x in items[i : i + b]]) for i in range(0, len(items), b)
    ]


def test_stream_passes_are_permutations_and_ranks_split_global_batches():
    one = _stream(batches=9)
    two = [_stream(world=2, rank=r, bs=2, batches=9) for r in range(2)]
    for epoch in range(3):
        for s in (one, *two):
            s.set_epoch(epoch)
        b1 = _batches(one)
        b2 = [_batches(s) for s in two]
        assert [src for src, _ in b1] == [src for src, _ in b2[0]] == [src for src, _ in b2[1]]
        assert [src for src, _ in b1].count("a") == 6  # weights 2:1 of 9 batches
        for j, (_, idx) in enumerate(b1):  # 1 x 4 and 2 x 2 read the same global batch
            assert sorted(idx) == sorted(b2[0][j][1] + b2[1][j][1])
    # source a: 20 samples = 5 batches per pass; its batches 0-4 are one permutation
    one.set_epoch(0)
    a = [idx for src, idx in _batches(one) if src == "a"]
    assert sorted(sum(a[:5], [])) == list(range(20))
    assert a[0] != _stream(batches=9).indices(0, 5)  # the next pass is reshuffled


def test_stream_resume_skips_exactly_and_workers_keep_the_order():
    full = _stream(batches=9, interleave="random")
    full.set_epoch(1)
    want = _batches(full)
    part = _stream(batches=9, interleave="random")
    part.set_epoch(1)
    part.resume(4, 4)
    assert _batches(part) == want[4:]
    # through a DataLoader with 2 workers, batch i comes from worker i % 2
    s = _stream(batches=9, interleave="random")
    s.set_epoch(1)
    s.resume(3, 4)
    dl = torch.utils.data.DataLoader(s, batch_size=4, num_workers=2,
                                     collate_fn=lambda it: (it[0][0], [int(x[0]) for _, x in it]))  # fmt: skip
    assert list(dl) == want[3:]


# -------------------------------------------------------------------------------- RoPE space
def test_rope_axes_equal_lifted_coordinates():
    torch.manual_seed(0)
    x, c = torch.randn(2, 1 + 6, 64), torch.rand(6, 2) * 2 - 1
    lifted = Predictor(PredictorConfig(dim=64, depth=1, heads=2, coord_dims=3)).eval()
    placed = Predictor(
        PredictorConfig(dim=64, depth=1, heads=2, coord_dims=2, rope_space=3, rope_axes=[1, 2])
    ).eval()
    placed.load_state_dict(lifted.state_dict())
    want = lifted(x, lift_coords(c, [1, 2], 3))
    assert torch.equal(placed(x, c), want)
    plain = Predictor(PredictorConfig(dim=64, depth=1, heads=2, coord_dims=2)).eval()
    plain.load_state_dict(lifted.state_dict())
    assert not torch.allclose(plain(x, c), want)  # the layout matters
    with pytest.raises(ValueError, match="rope_axes"):
        PredictorConfig(dim=64, heads=2, coord_dims=2, rope_space=3, rope_axes=[1, 3])


# ----------------------------------------------------------------- training, monitor, init
def test_joint_run_trains_every_source_and_monitors_each(tmp_path):
    rec = Record()
    cfg = joint_cfg(tmp_path / "run", {"image": IMAGE, "video": VIDEO}, "trainer.max_steps=6",
                    "trainer.collapse_every_n_steps=3", "data.modality_embedding=true",
                    "data.batches_per_epoch=6")  # fmt: skip
    trainer = fit(cfg, callbacks=[rec])
    assert sorted(set(rec.sources.values())) == ["image", "video"]
    assert list(rec.sources.values()).count("image") == 4  # weights 2:1
    mon = next(c for c in trainer.callbacks if type(c).__name__ == "CollapseMonitor")
    seen = {k.split("/")[0] for h in mon.history for k in h if k.endswith("erank")}
    assert seen == {"image", "video"}  # each modality checked on its own batches
    m = trainer.callback_metrics
    assert "val/image/loss" in m and "val/video/loss" in m
    model = trainer.lightning_module.model
    assert model.predictor.cfg.coord_dims == 3
    assert set(model.tokenizer.tokenizers) == {"image", "video"}
    assert model.tokenizer.modality["image"].abs().sum() > 0  # learned


def test_joint_checkpoint_initialises_each_single_modality_task(tmp_path):
    run = tmp_path / "joint"
    fit(joint_cfg(run, {"image": IMAGE, "video": VIDEO}, "trainer.max_steps=3",
                  "data.modality_embedding=true"))  # fmt: skip
    ckpt = run / "checkpoints/last.ckpt"
    sd = {k[6:]: v for k, v in read_checkpoint(ckpt)["state_dict"].items()}
    image = ["task=fmnist_classify", "data.root=''", "data.generated_samples=16",
             "model.name=nepa_debug", "model.tokenizer_args.in_chans=1",
             "model.tokenizer_args.patch_size=7", "trainer.accelerator=cpu"]  # fmt: skip
    with pytest.raises(CheckpointError, match=r"rope_space=3 model.predictor.rope_axes=\[1,2\]"):
        LitTask(load_config(None, [*image, f"model.init=pretrain:{ckpt}"]))
    rope = ["model.predictor.rope_space=3", "model.predictor.rope_axes=[1,2]"]
    lit = LitTask(load_config(None, [*image, *rope, f"model.init=pretrain:{ckpt}"]))
    m = lit.model.eval()
    for k, v in sd.items():
        if k.startswith(("predictor.", "cls_token")) and "norm" not in k:
            assert torch.equal(m.state_dict()[k], v), k
    assert torch.equal(
        m.state_dict()["tokenizer.proj.weight"], sd["tokenizer.tokenizers.image.proj.weight"]
    )
    # the modality embedding is folded into the bias: the single model's tokens are the joint's
    joint = LitTask(joint_cfg(tmp_path / "x", {"image": IMAGE, "video": VIDEO},
                              "data.modality_embedding=true")).model  # fmt: skip
    joint.load_state_dict(sd)
    x = torch.randn(2, 1, 28, 28)
    want = joint.tokenizer({"source": "image", "input": x})
    got = m.tokenizer(x)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=0, atol=1e-6)
    assert torch.equal(lift_coords(got.coords, [1, 2], 3), want.coords)
    # video: 3-D coordinates are the space itself, no RoPE keys to set
    video = ["task=video_classify", "model.name=nepa_video_debug", "data.image_size=8",
             "data.num_frames=4", "data.num_workers=0", "trainer.accelerator=cpu"]  # fmt: skip
    v = LitTask(load_config(None, [*video, f"model.init=pretrain:{ckpt}:ema@video"])).model
    assert torch.equal(
        v.state_dict()["tokenizer.proj.weight"],
        read_checkpoint(ckpt)["ema_state_dict"]["tokenizer.tokenizers.video.proj.weight"],
    )
    with pytest.raises(CheckpointError, match="no joint source 'audio'"):
        LitTask(load_config(None, [*video, f"model.init=pretrain:{ckpt}@audio"]))


def test_two_sources_with_one_tokenizer_need_a_name(tmp_path):
    run = tmp_path / "joint"
    other = {**IMAGE, "data": {"generated_samples": 16, "subset_seed": 3}}
    fit(joint_cfg(run, {"a": IMAGE, "b": other}, "trainer.max_steps=1"))
    ckpt = run / "checkpoints/last.ckpt"
    image = ["task=fmnist_classify", "model.name=nepa_debug", "model.tokenizer_args.in_chans=1",
             "model.tokenizer_args.patch_size=7", "model.predictor.rope_space=3",
             "model.predictor.rope_axes=[1,2]", "trainer.accelerator=cpu"]  # fmt: skip
    with pytest.raises(CheckpointError, match=r"\['a', 'b'\]: add @SOURCE"):
        LitTask(load_config(None, [*image, f"model.init=pretrain:{ckpt}"]))
    LitTask(load_config(None, [*image, f"model.init=pretrain:{ckpt}@b"]))


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "sources, over, msg",
    [
        (
            {"a": {"task": "fmnist_pretrain", "wieght": 1}},
            [],
            r"data.sources.a.wieght: unknown key",
        ),
        ({"a": {"weight": 1}}, [], r"data.sources.a: give a task"),
        ({"a": {**IMAGE, "weight": 0}}, [], r"data.sources.a.weight=0.0 must be > 0"),
        ({"a": {**IMAGE, "model": {"predictor": {"depth": 2}}}}, [], r"a.model.predictor"),
        ({"a": {"task": "fmnist_pretrain"}}, [], r"data.sources.a: .*in_chans=3"),
        ({"a": IMAGE}, ["trainer.strategy=ddp"], "find_unused_parameters=true"),
        ({"a": IMAGE}, ["model.tokenizer_args.patch_size=4"], "sources' "),
        ({"a": {**IMAGE, "axes": [0, 5]}}, [], r"axes=\[0, 5\]"),
    ],
)
def test_bad_joint_configs_fail_in_one_line(tmp_path, sources, over, msg):
    with pytest.raises((ConfigError, ValueError), match=msg) as e:
        LitTask(joint_cfg(tmp_path, sources, *over))
    assert "\n" not in str(e.value)


# ------------------------------------------------------- exact resume, the shipped readers
def _real_sources(tmp_path):
    """Fashion-MNIST (Debian's files when installed), spoken digits synthesised to WAV and
    decoded by the audio folder reader, mp4 clips decoded by the video folder reader."""
    from unipred.tasks.audio.spoken_digits import available_engines
    from unipred.tasks.image.fmnist_data import has_fashion_mnist
    from unipred.tasks.video.data import write_video
    from unipred.tasks.video.tasks import moving_shape_clip

    if not available_engines():
        pytest.skip("espeak-ng / flite not installed")
    fm = "/usr/share/datasets/fashion-mnist"
    image = {**IMAGE, "data": {"root": fm if has_fashion_mnist(fm) else "",
                               "train_samples": 40, "generated_samples": 40}}  # fmt: skip
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(12):
        write_video(clips / f"c{i:02d}.mp4", moving_shape_clip(i, i % 4, 8, 4), preset="ultrafast")
    video = {**VIDEO, "data": {**VIDEO["data"], "root": str(clips), "resize_scale": 1.0}}
    audio = {"config": "audio/digits_pretrain", "model": {"name": "nepa_audio_debug",
             "tokenizer_args": {"n_mels": 32, "patch_size": [8, 32]}},
             "data": {"train_per_class": 2, "val_per_class": 1, "max_seconds": 1.0,
                      "digits_dir": str(tmp_path / "digits"), "cache_mb": 0}, "axes": [0, 1]}  # fmt: skip
    return {"image": image, "audio": audio, "video": video}


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_with_the_shipped_readers(tmp_path):
    sources = _real_sources(tmp_path)
    over = ["trainer.max_epochs=2", "data.batches_per_epoch=8", "trainer.ckpt_every_n_steps=2",
            "model.predictor.drop_path=0.1", "data.interleave=random"]  # fmt: skip
    full = Record()
    fit(joint_cfg(tmp_path / "full", sources, *over), callbacks=[full])
    assert sorted(full.losses) == list(range(1, 17))
    assert set(full.sources.values()) == {"image", "audio", "video"}
    first = Record()
    with pytest.raises(RuntimeError, match="killed"):
        fit(joint_cfg(tmp_path / "cut", sources, *over), callbacks=[first, Kill(11)])
    second = Record()
    fit(joint_cfg(tmp_path / "cut", sources, *over, "resume=auto"), callbacks=[second])
    assert sorted(second.losses) == list(range(11, 17))  # resumed after step 10, mid epoch 2
    merged = {**{k: v for k, v in first.losses.items() if k <= 10}, **second.losses}
    assert merged == full.losses  # exactly
    a = read_checkpoint(tmp_path / "full/checkpoints/last.ckpt")
    b = read_checkpoint(tmp_path / "cut/checkpoints/last.ckpt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k in a["ema_state_dict"]:
        assert torch.equal(a["ema_state_dict"][k], b["ema_state_dict"][k]), k


# ------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    image = {**IMAGE, "data": {"generated_samples": 32, "shift": 0, "hflip": False}}
    sources = {"image": image, "video": VIDEO}
    over = ["trainer.max_steps=4", "model.predictor.rope_rescale=0",
            "trainer.find_unused_parameters=true", "data.modality_embedding=true"]  # fmt: skip
    fit(joint_cfg(tmp_path / "one", sources, *over))
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unipred.cli", "fit", "task=joint_pretrain",
           f"data.sources={json.dumps(sources)}", f"run_dir={tmp_path / 'two'}", *ENGINE, *over,
           "trainer.devices=2", "trainer.strategy=ddp"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per_device_batch        2" in proc.stdout
    a = read_checkpoint(tmp_path / "one/checkpoints/last.ckpt")
    b = read_checkpoint(tmp_path / "two/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    moved = 0
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for k in a["ema_state_dict"]:
        torch.testing.assert_close(
            b["ema_state_dict"][k], a["ema_state_dict"][k], rtol=1e-4, atol=1e-5, msg=k
        )
    init = LitTask(joint_cfg(tmp_path / "x", sources, *over)).model.state_dict()
    moved = sum(not torch.equal(init[k[6:]], v) for k, v in a["state_dict"].items())
    assert moved > 10
