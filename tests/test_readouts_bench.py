"""benchmarks/readouts.py on variable-length inputs: the padded token store keeps each
sample's own coordinates, so its grid read-out equals the per-batch read-out of
``unipred eval`` (batches of different lengths; the first batch's coordinates used for every
sample was wrong and raised), and the raw patches pool the same way."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from unipred.nn.model import NEPA, model_config
from unipred.protocols import extract_features
from unipred.protocols.baselines import raw_patches
from unipred.protocols.features import grid_pool

ROOT = Path(__file__).resolve().parents[1]
SR = 16000


def _bench():
    spec = importlib.util.spec_from_file_location("readouts", ROOT / "benchmarks/readouts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batches():
    """Two batches of clips of different lengths (so different token counts per batch)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, lengths in ((SR, [SR, SR // 2]), (SR // 2, [SR // 2, SR // 4, SR // 3])):
        wave = 0.1 * torch.randn(len(lengths), n, generator=g)
        out.append(({"wave": wave, "lengths": torch.tensor(lengths)}, torch.arange(len(lengths))))
    return out


def test_padded_tokens_give_the_per_batch_grid_read_out():
    ro = _bench()
    torch.manual_seed(0)
    kw = {"tokenizer": "audio", "tokenizer_args": {"n_mels": 32, "patch_size": [8, 32]}}
    model = NEPA(model_config("nepa_debug", causal=True, **kw))
    batches = _batches()
    toks, pre, valid, coords, labels = ro._tokens(model, batches, lambda b: b[0], None)
    assert (
        toks.shape[0] == 5 and pre.shape[1] == model.n_prefix and labels.tolist() == [0, 1, 0, 1, 2]
    )
    assert not bool(valid.all())  # shorter clips are padded
    for g in (1, 2, 3):
        want = extract_features(model, batches, pool="grid", cells=g).pooled
        got = grid_pool(toks, 0, valid, coords, g)
        assert torch.allclose(got, want, atol=1e-4), g
    pools = ro._pools(toks, pre, valid, coords, [1, 2])
    assert set(pools) == {"mean", "grid 2", "last", "cls"}
    # --norms: the eval's per-sample standardisation (features.norm), the same read-outs after
    # it; "feature" has no mean read-out (it would be zero) and changes the grid
    normed = ro._pools(toks, pre, valid, coords, [1, 2], ["none", "feature"])
    assert set(normed) == {"mean", "grid 2", "last", "cls", "grid 2, norm feature",
                           "last, norm feature"}  # fmt: skip
    assert torch.equal(normed["grid 2"], pools["grid 2"])
    assert not torch.allclose(normed["grid 2, norm feature"], pools["grid 2"])
    want = extract_features(model, batches, pool="grid", cells=2, norm="feature").pooled
    assert torch.allclose(normed["grid 2, norm feature"], want, atol=1e-4)
    # the block read-out differs from the final norm's
    blk = ro._tokens(model, batches, lambda b: b[0], 0)[0]
    assert blk.shape == toks.shape and not torch.allclose(blk, toks)


def test_raw_patches_pool_per_sample():
    ro = _bench()
    kw = {"tokenizer": "audio", "tokenizer_args": {"n_mels": 32, "patch_size": [8, 32]}}
    model = NEPA(model_config("nepa_debug", causal=True, **kw))
    batches = _batches()
    rows, valid, coords, labels = ro._raw(model, batches, lambda b: b[0])
    means = grid_pool(rows, 0, valid, coords, 1)
    # the mean read-out of one sample is the mean of its own real patches, padding excluded
    x, _ = batches[1]
    p = raw_patches(model.tokenizer, x)[1].float()
    n = int(model.tokenizer(x).valid[1].sum())
    assert torch.allclose(means[3], p[:n].mean(0), atol=1e-5)


@pytest.mark.parametrize("recipe", ["video/demo_classify", "audio/digits_linprobe"])
def test_the_video_and_audio_probe_recipes_read_a_grid(recipe):
    """The recipes' eval_defaults: a 2-per-axis grid (video: t, y, x; audio: time, frequency);
    the command line wins."""
    from unipred.cli import _with_recipe_defaults
    from unipred.protocols import parse_eval_settings
    from unipred.train.config import load_config

    cfg = load_config(recipe, [])
    s = _with_recipe_defaults(parse_eval_settings([]), cfg, [])
    assert (s.features.pool, s.features.grid) == ("grid", 2)
    s = _with_recipe_defaults(parse_eval_settings([]), cfg, ["features.pool=mean"])
    assert s.features.pool == "mean"


def test_spoken_words_builds_a_word_set(tmp_path):
    """benchmarks/spoken_words.py, run as a user runs it: one folder per word, each with its
    clips, and the digits' module left speaking digits in this process."""
    import shutil
    import subprocess
    import sys

    from unipred.tasks.audio import spoken_digits

    if not (shutil.which("espeak-ng") or shutil.which("flite")):
        pytest.skip("no speech synthesiser")
    out = tmp_path / "words"
    cmd = [sys.executable, "-P", str(ROOT / "benchmarks/spoken_words.py"), str(out),
           "--train-per-class", "1", "--test-per-class", "1"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    words = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
    for split in ("train", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(words)
        assert all(len(list((out / split / w).glob("*.wav"))) == 1 for w in words)
    assert spoken_digits.DIGITS[0] == "zero"


def test_cls_pooling_of_a_causal_backbone_is_refused_because_it_sees_only_itself():
    from unipred.protocols.settings import ProtocolError

    kw = {"tokenizer": "audio", "tokenizer_args": {"n_mels": 32, "patch_size": [8, 32]}}
    torch.manual_seed(0)
    causal = NEPA(model_config("nepa_debug", causal=True, **kw))
    assert causal.n_prefix >= 1
    batches = _batches()
    # the premise: in a causal backbone the first token's output does not depend on the input
    ro = _bench()
    _, pre, *_ = ro._tokens(causal, batches, lambda b: b[0], None)
    assert float((pre[:, 0] - pre[:1, 0]).abs().max()) < 1e-7  # bidirectional: ~1e-5 here
    with pytest.raises(ProtocolError, match="features.pool=cls: the cls token comes first"):
        extract_features(causal, batches, pool="cls")
    # a bidirectional backbone's cls token reads the input: allowed, and it differs per sample
    torch.manual_seed(0)
    both = NEPA(model_config("nepa_debug", causal=False, **kw))
    f = extract_features(both, batches, pool="cls").pooled
    assert f.shape[0] == 5 and not f.requires_grad
    assert float((f[0] - f[1]).abs().max()) > 0  # small at random init (LayerScale), not zero
