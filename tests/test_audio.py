"""Audio: tokenizer shapes, order and coordinates; padding invariance; data reading; synthesis."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from unipred.model import NEPA, model_config
from unipred.registry import TOKENIZERS

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


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_present_marker():
    assert shutil.which("espeak-ng")
