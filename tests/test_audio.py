"""Audio: tokenizer shapes, order and coordinates; padding invariance; data reading; synthesis."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from unipred.base.registry import TOKENIZERS
from unipred.nn.model import NEPA, model_config

SR = 16000


def _tone(freq: float, seconds: float, start: float = 0.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    w = 0.5 * torch.sin(2 * math.pi * freq * t)
    return w * (t >= start)


def _audio_model(tokenizer="audio", causal=True, head=None, **tk):
    args = {"n_mels": 32, "patch_size": 16, "time_span": 2.0} if tokenizer == "audio" else {}
    args.update(tk)
    over = dict(tokenizer=tokenizer, tokenizer_args=args, causal=causal)
    if head:
        over.update(head=head, num_classes=5)
    torch.manual_seed(0)
    m = NEPA(model_config("nepa_debug", **over)).eval()
    if head:  # the release zero-inits the classifier; random weights make the test bite
        torch.nn.init.normal_(m.head.classifier.weight)
    return m


def test_spectrogram_tokens_shape_and_mask():
    tk = TOKENIZERS.get("audio")(dim=32)  # defaults: 16 kHz, 128 mels, 25/10 ms, 16x16
    assert tk.coord_dims == 2 and tk.win == 400 and tk.hop == 160
    wave = torch.randn(2, SR)  # 1 s -> 98 frames -> 6 time patches x 8 mel patches
    out = tk({"wave": wave, "lengths": torch.tensor([SR, SR // 2])})
    assert out.tokens.shape == (2, 48, 32) and out.coords.shape == (48, 2)
    assert out.valid.shape == (2, 48)
    assert out.valid[0].all() and out.valid[1].sum() == 24 and out.valid[1, :24].all()
    # same result from the tuple form; a bare tensor means "all real"
    tup = tk((wave, torch.tensor([SR, SR // 2])))
    torch.testing.assert_close(tup.tokens, out.tokens)
    assert tk(wave).valid.all()


def test_spectrogram_order_is_time_major_low_to_high():
    tk = TOKENIZERS.get("audio")(dim=1, mean=-5.0, std=5.0)
    with torch.no_grad():  # each token = the mean of its patch, so we can see the energy
        tk.proj.weight.fill_(1.0 / 256)
        tk.proj.bias.zero_()
    # silence for 0.5 s, then a 6 kHz tone: energy must sit late in time and high in frequency
    wave = _tone(6000, 1.0, start=0.5)[None]
    tok = tk(wave).tokens[0, :, 0].view(6, 8)  # (time, freq) in the tokens' own order
    assert tok[:2].max() < tok[4:].min()  # later patches are louder: "next" = later in time
    assert int(tok[5].argmax()) == 7  # the top mel patch holds the 6 kHz tone
    c = tk.coords(6, 8, "cpu").view(6, 8, 2)
    assert (c[1:, :, 0] > c[:-1, :, 0]).all() and (c[:, 1:, 1] > c[:, :-1, 1]).all()
    assert (c[:, :, 0] == c[:, :1, 0]).all()  # one time value per time step
    # absolute time: a patch spans 16 frames x 10 ms = 0.16 s, so patch 0 is centred at 0.08 s
    tk2 = TOKENIZERS.get("audio")(dim=1, time_span=1.0)
    assert tk2.coords(3, 8, "cpu")[0, 0].item() == pytest.approx(2 * 0.08 - 1)


def test_spectrogram_patch_matches_conv_on_that_patch():
    tk = TOKENIZERS.get("audio")(dim=8, n_mels=32)
    wave = torch.randn(1, SR)
    spec = tk.spectrogram(wave)  # (1, frames, mels)
    tok = tk(wave).tokens  # (1, 6*2, 8)
    t, f = 3, 1
    patch = spec[0, t * 16 : (t + 1) * 16, f * 16 : (f + 1) * 16]
    ref = (tk.proj.weight[:, 0] * patch).sum(dim=(1, 2)) + tk.proj.bias
    torch.testing.assert_close(tok[0, t * 2 + f], ref, rtol=1e-4, atol=1e-4)


def test_frame_tokenizer():
    tk = TOKENIZERS.get("audio_frames")(dim=16, frame_ms=20.0)
    assert tk.coord_dims == 1
    wave = torch.randn(3, 8000)
    out = tk({"wave": wave, "lengths": torch.tensor([8000, 4000, 650])})
    assert out.tokens.shape == (3, 25, 16) and out.coords.shape == (25, 1)
    assert out.valid.sum(1).tolist() == [25, 12, 2]
    assert (out.coords[1:, 0] > out.coords[:-1, 0]).all()


def test_bad_inputs_name_the_problem():
    tk = TOKENIZERS.get("audio")(dim=8)
    with pytest.raises(ValueError, match="shorter than one patch"):
        tk(torch.randn(1, 1000))
    with pytest.raises(ValueError, match="mono"):
        tk(torch.randn(1, 2, SR))
    with pytest.raises(ValueError, match="lengths"):
        tk({"wave": torch.randn(2, SR), "lengths": torch.tensor([SR + 1, 5])})


def _pad_batch(short: torch.Tensor, long: torch.Tensor, garbage: bool):
    wave = torch.zeros(2, long.shape[0])
    wave[0, : short.shape[0]] = short
    if garbage:  # what sits in the padding must not matter at all
        wave[0, short.shape[0] :] = torch.randn(long.shape[0] - short.shape[0]) * 3
    wave[1] = long
    return {"wave": wave, "lengths": torch.tensor([short.shape[0], long.shape[0]])}


@pytest.mark.parametrize("tokenizer", ["audio", "audio_frames"])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_cannot_change_loss(tokenizer, causal):
    torch.manual_seed(1)
    short, long = torch.randn(int(0.7 * SR)) * 0.3, torch.randn(int(1.3 * SR)) * 0.3
    m = _audio_model(tokenizer, causal=causal)
    with torch.no_grad():
        alone = m(short[None])
        long_alone = m(long[None])
        both = m(_pad_batch(short, long, garbage=True))
    n_a = int(alone.valid.sum()) if alone.valid is not None else alone.predictions.shape[1]
    n_b = long_alone.predictions.shape[1]
    torch.testing.assert_close(
        both.predictions[0, :n_a], alone.predictions[0], rtol=1e-4, atol=1e-4
    )
    # the batch loss is the pair-weighted mean of the two clips' own losses
    expect = (alone.loss * (n_a - 1) + long_alone.loss * (n_b - 1)) / (n_a + n_b - 2)
    torch.testing.assert_close(both.loss, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head", ["mean", "last"])
def test_padding_cannot_change_logits(causal, head):
    torch.manual_seed(2)
    short, long = torch.randn(int(0.6 * SR)) * 0.3, torch.randn(int(1.5 * SR)) * 0.3
    m = _audio_model("audio", causal=causal, head=head)
    with torch.no_grad():
        alone = m(short[None]).logits
        both = m(_pad_batch(short, long, garbage=True)).logits
    torch.testing.assert_close(both[0], alone[0], rtol=1e-4, atol=1e-4)
    assert alone.abs().max() > 1e-3  # logits are not trivially zero


def test_padding_would_matter_without_the_mask():
    """Guard against a vacuous invariance test: ignoring lengths changes the logits."""
    torch.manual_seed(3)
    short, long = torch.randn(int(0.6 * SR)) * 0.3, torch.randn(int(1.5 * SR)) * 0.3
    m = _audio_model("audio", causal=False, head="mean")
    batch = _pad_batch(short, long, garbage=True)
    with torch.no_grad():
        alone = m(short[None]).logits
        unmasked = m(batch["wave"]).logits
    assert not torch.allclose(unmasked[0], alone[0], rtol=1e-4, atol=1e-4)


def test_resample_in_tokenizer():
    tk = TOKENIZERS.get("audio")(dim=8)
    w8k = _tone(440, 1.0)[None, ::2].contiguous()  # 8 kHz copy
    out = tk({"wave": w8k, "lengths": torch.tensor([8000]), "sample_rate": 8000})
    assert out.tokens.shape[1] == 48  # 1 s at 16 kHz after resampling


# ------------------------------------------------------------------------------------ data
def _write_clips(root, spec):
    """spec: {relative path: seconds}; writes 440 Hz tones (wav, or flac by extension)."""
    from torchcodec.encoders import AudioEncoder
    from unipred.tasks.audio.spoken_digits import write_wav

    for rel, secs in spec.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".flac":
            AudioEncoder(_tone(440, secs)[None], sample_rate=SR).to_file(str(p))
        else:
            write_wav(p, _tone(440, secs))


def test_folder_reader_skips_and_counts_corrupt_files(tmp_path):
    from unipred.tasks.audio.data import ClipTransform, audio_dataset, pad_collate

    from unipred.data.accounting import BadSampleCounter

    _write_clips(tmp_path, {"cat/a.wav": 0.6, "cat/b.flac": 1.0, "dog/c.wav": 0.3})
    (tmp_path / "dog" / "broken.wav").write_bytes(b"RIFF not really a wav file")
    (tmp_path / "_background_noise_").mkdir()  # Speech Commands' noise folder is no class
    counter = BadSampleCounter()
    ds = audio_dataset(str(tmp_path), ClipTransform(SR, 0.8, 0.5), counter=counter)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    got = [ds[i] for i in range(len(ds))]  # broken.wav (index 2) is replaced by c.wav
    assert counter.snapshot()["skipped/corrupt"] == 1
    assert [w.numel() for w, _ in got] == [int(0.6 * SR), int(0.8 * SR), 8000, 8000]
    x, y = pad_collate(got)
    assert x["wave"].shape == (4, int(0.8 * SR)) and x["lengths"].tolist()[2] == 8000
    assert x["wave"][2, 8000:].abs().sum() == 0 and y.tolist() == [0, 0, 1, 1]


def test_decode_cache_serves_the_same_clips_and_redecodes_edited_files(tmp_path, monkeypatch):
    import os

    import unipred.tasks.audio.data as A
    from unipred.tasks.audio.spoken_digits import write_wav

    from unipred.data.accounting import BadSampleCounter

    _write_clips(tmp_path, {"cat/a.wav": 0.6, "cat/b.flac": 1.0, "dog/c.wav": 0.3})
    (tmp_path / "dog" / "broken.wav").write_bytes(b"RIFF not really a wav file")
    decoded = []
    real = A.decode_audio
    monkeypatch.setattr(
        A, "decode_audio", lambda src, sr, *a: decoded.append(src) or real(src, sr, *a)
    )
    tf = A.ClipTransform(SR, 0.8, 0.5)
    plain = A.audio_dataset(str(tmp_path), tf, counter=BadSampleCounter())
    want = [plain[i][0] for i in range(len(plain))]
    decoded.clear()
    counter = BadSampleCounter()
    cache = A.DecodeCache(max_mb=1)
    ds = A.AudioFolder(plain.items, plain.classes, tf, counter=counter, cache=cache)
    for _ in range(3):  # three epochs: each readable file decoded once, the broken one each time
        got = [ds[i][0] for i in range(len(ds))]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert counter.snapshot()["skipped/corrupt"] == 1  # once per epoch
        counter.reset()  # (the engine does this at every epoch end)
    assert len(decoded) == 3 + 3
    assert cache.misses == 3 and cache.hits == 3 * 4 - 3  # c.wav read twice per epoch
    a = tmp_path / "cat" / "a.wav"
    write_wav(a, _tone(440, 0.7))  # edited in place: a new size/mtime is a new key
    os.utime(a, ns=(1, 1))
    decoded.clear()
    assert ds[0][0].numel() == int(0.7 * SR) and len(decoded) == 1
    small = A.DecodeCache(max_mb=1.5 * 0.6 * SR * 4 / 2**20)  # room for one 0.6 s clip only
    for p in ("cat/a.wav", "dog/c.wav", "cat/a.wav"):
        small.get(tmp_path / p, SR)
    assert small.misses == 3 and small.bytes <= small.max_bytes  # c.wav pushed a.wav out
    assert A.shared_cache(0) is None and A.shared_cache(4) is A.shared_cache(2)


def test_csv_layout_with_where(tmp_path):
    from unipred.tasks.audio.data import list_audio

    _write_clips(tmp_path / "audio", {"1.wav": 0.5, "2.wav": 0.5, "3.wav": 0.5})
    (tmp_path / "meta.csv").write_text(
        "filename,fold,category\n1.wav,1,dog\n2.wav,2,rain\n3.wav,1,cat\n"
    )
    items, classes = list_audio(tmp_path / "audio", str(tmp_path / "meta.csv"), "filename",
                                "category", "fold=1")  # fmt: skip
    assert classes == ["cat", "dog", "rain"]  # ordered over every row, so splits agree
    assert [(p.name, y) for p, y in items] == [("1.wav", 1), ("3.wav", 0)]
    with pytest.raises(ValueError, match="no column 'path'"):
        list_audio(tmp_path / "audio", str(tmp_path / "meta.csv"))


def test_pack_audio_round_trip_skips_corrupt(tmp_path):
    import argparse

    from unipred.tasks.audio.data import AudioShardDataset, ClipTransform
    from unipred.tasks.audio.pack import add_arguments, run

    from unipred.data.accounting import BadSampleCounter

    src = tmp_path / "src"
    _write_clips(src, {"yes/a.wav": 0.5, "yes/b.wav": 0.7, "no/c.flac": 0.4, "no/d.wav": 0.5})
    (src / "no" / "bad.wav").write_bytes(b"\x00" * 100)
    (tmp_path / "test_list.txt").write_text("no/d.wav\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        [
            str(src),
            str(tmp_path / "out"),
            "--shard-size",
            "2",
            "--exclude-list",
            str(tmp_path / "test_list.txt"),
            "--stats-clips",
            "3",
        ]
    )
    assert run(args) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["num_samples"] == 3 and len(meta["skipped"]) == 1 and meta["num_shards"] == 2
    assert meta["classes"] == ["no", "yes"] and meta["logmel_std"] > 0
    counter = BadSampleCounter()
    ds = AudioShardDataset(str(tmp_path / "out"), ClipTransform(SR, 10.0, 0.0), shuffle_buffer=0,
                           counter=counter)  # fmt: skip
    got = sorted((w.numel(), y) for w, y in ds)
    assert got == [(int(0.4 * SR), 0), (int(0.5 * SR), 1), (int(0.7 * SR), 1)]
    assert counter.snapshot()["skipped/total"] == 0


# ------------------------------------------------------------------------------ synthesis
@pytest.mark.skipif(
    shutil.which("espeak-ng") is None and shutil.which("flite") is None,
    reason="neither espeak-ng nor flite is installed (apt-get install -y espeak-ng flite)",
)
def test_spoken_digit_synthesis(tmp_path):
    from unipred.tasks.audio.data import ClipTransform, audio_dataset
    from unipred.tasks.audio.spoken_digits import synthesize, voices

    assert not set(voices("train")) & set(voices("test"))  # held-out voices are unseen
    root = synthesize(tmp_path / "sd", train_per_class=2, test_per_class=1, seed=0)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 20, "test": 10} and manifest["failed"] == 0
    ds = audio_dataset(str(root / "test"), ClipTransform(SR))
    assert len(ds.classes) == 10 and sorted(y for _, y in ds) == list(range(10))
    wave, _ = ds[3]
    assert 0.3 * SR < wave.numel() < 3 * SR and wave.abs().max() > 0.05  # speech, not silence
    mtime = (root / "manifest.json").stat().st_mtime
    synthesize(tmp_path / "sd", train_per_class=2, test_per_class=1, seed=0)  # cached
    assert (root / "manifest.json").stat().st_mtime == mtime


# -------------------------------------------------------------------------------- configs
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs/audio").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_audio_configs_load(path):
    from unipred.base.registry import TASKS
    from unipred.train.config import load_config

    cfg = load_config(path, check_paths=False)
    assert cfg.task in ("audio_pretrain", "audio_classify", "audio_events_segment")
    task = TASKS.get(cfg.task)(cfg)
    if cfg.task == "audio_events_segment":  # tests/test_segment.py trains it
        assert task.build_model().tokenizer.coord_dims == 2 and task.source.label_axes == (0,)
        return
    mc = task.model_config(head="none" if cfg.task == "audio_pretrain" else "mean", num_classes=10)
    assert mc.tokenizer == "audio" and mc.predictor.coord_dims == 2
    if cfg.model.head == "probe":  # the probe trains the head alone (checked on a tiny size)
        from unipred.train.optim import freeze

        cfg = load_config(path, ["model.name=nepa_audio_debug", "model.tokenizer_args={}"],
                          check_paths=False)  # fmt: skip
        model = TASKS.get(cfg.task)(cfg).build_model()
        freeze(model, cfg.optim.freeze)
        assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"head"}


@pytest.mark.parametrize("norm", ["clip", "cmvn"])
def test_clip_norm_cancels_a_clips_gain_and_ignores_its_padding(norm):
    """Per-clip normalisation (model.tokenizer_args.clip_norm): a louder copy of a clip gives
    the same tokens (a gain is an offset of every log-mel value), padding after the clip
    enters no statistic, and ``cmvn`` leaves each mel bin zero-mean over the clip's frames."""
    torch.manual_seed(0)
    tk = TOKENIZERS.get("audio")(dim=8, n_mels=32, patch_size=(8, 32), clip_norm=norm)
    plain = TOKENIZERS.get("audio")(dim=8, n_mels=32, patch_size=(8, 32))
    wave = torch.randn(1, SR // 2) * torch.linspace(0.1, 1.0, SR // 2)
    a = tk.patches(wave)
    assert torch.allclose(a, tk.patches(3.0 * wave), atol=1e-3)
    assert not torch.allclose(plain.patches(wave), plain.patches(3.0 * wave), atol=1e-1)
    padded = {"wave": torch.cat([wave, torch.zeros(1, SR // 2)], 1), "lengths": [SR // 2]}
    b = tk.patches(padded)
    assert torch.allclose(a, b[:, : a.shape[1]], atol=1e-4)
    spec = tk.spectrogram(wave)
    dims = (1,) if norm == "cmvn" else (1, 2)
    assert torch.allclose(spec.mean(dims), torch.zeros(1), atol=1e-4)
    assert torch.allclose(spec.std(dims, unbiased=False), torch.ones(1), atol=1e-3)
    with pytest.raises(ValueError, match="clip_norm='cvmn'"):
        TOKENIZERS.get("audio")(dim=8, clip_norm="cvmn")


def test_digits_recipes_share_the_tokenizer_and_the_objective_ignores_padding():
    """The probe and fine-tune recipes read clips as the pretraining recipe tokenised them (a
    mismatch, e.g. clip_norm, gives silently wrong frozen numbers), and the recipe's objective
    (InfoNCE over the whole batch, whose candidates are every clip's tokens) gives one loss
    whatever sits in a shorter clip's padding."""
    import dataclasses

    from unipred.nn.objectives import ObjectiveConfig
    from unipred.train.config import load_config

    pre, probe, ft = (load_config(f"audio/{n}", check_paths=False)
                      for n in ("digits_pretrain", "digits_linprobe", "digits_finetune"))  # fmt: skip
    assert pre.model.tokenizer_args == probe.model.tokenizer_args == ft.model.tokenizer_args
    # the frozen protocols read a 2-cell time grid and cross-validate the linear probe's lr
    assert probe.eval_defaults == {"features": {"pool": "grid", "grid": 2},
                                   "linear": {"lr_grid": [3e-4, 1e-3, 3e-3, 1e-2]}}  # fmt: skip
    keys = {k: v for k, v in dataclasses.asdict(pre.model.objective).items() if v is not None}
    assert keys.get("loss") == "infonce_batch"
    m = _audio_model("audio", clip_norm=pre.model.tokenizer_args["clip_norm"])
    torch.manual_seed(0)
    m = NEPA(dataclasses.replace(m.cfg, objective=ObjectiveConfig(**keys))).eval()
    torch.manual_seed(3)
    short, long = torch.randn(int(0.7 * SR)) * 0.3, torch.randn(int(1.3 * SR)) * 0.3
    with torch.no_grad():
        clean = m(_pad_batch(short, long, garbage=False)).loss
        noisy = m(_pad_batch(short, long, garbage=True)).loss
    assert torch.isfinite(clean)
    torch.testing.assert_close(noisy, clean, rtol=1e-5, atol=1e-6)
