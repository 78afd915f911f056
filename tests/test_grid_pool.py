"""features.pool=grid: the frozen protocols' read-out that keeps where each token sits (the
tokens averaged per cell of a grid over their coordinates, cells concatenated), for every
tokenizer, through the generic protocol code."""

from __future__ import annotations

import pytest
import torch

from unipred.nn.model import NEPA, model_config
from unipred.nn.rope import grid_coords
from unipred.protocols import ProtocolError, extract_features, parse_eval_settings
from unipred.protocols.features import grid_pool

SR = 16000
TOKENIZERS = {
    "image": ({"tokenizer_args": {"patch_size": 4, "in_chans": 3}}, 2),
    "video": ({"tokenizer": "video", "tokenizer_args": {"patch_size": 4, "tubelet_size": 2}}, 3),
    "audio": ({"tokenizer": "audio", "tokenizer_args": {"n_mels": 32, "patch_size": 8}}, 2),
    "audio_frames": ({"tokenizer": "audio_frames", "tokenizer_args": {"frame_ms": 50.0}}, 1),
    "text": ({"tokenizer": "text", "tokenizer_args": {}}, 1),
}


def _input(name, B=3):
    torch.manual_seed(1)
    if name == "image":
        return torch.randn(B, 3, 16, 16)
    if name == "video":
        return torch.randn(B, 3, 4, 8, 8)
    if name == "text":
        return torch.randint(1, 256, (B, 12))
    lengths = torch.tensor([SR // 2] + [SR // 4] * (B - 1))  # padded clips: valid masks
    return {"wave": 0.1 * torch.randn(B, SR // 2), "lengths": lengths}


def test_grid_cells_are_the_means_of_the_image_quadrants():
    """A 4 x 4 token grid, 2 cells per axis: each cell is the mean of its 2 x 2 quadrant, in
    raster order of the cells; 4 cells per axis keep every token in raster order."""
    g = torch.Generator().manual_seed(0)
    B, D = 2, 5
    hidden = torch.randn(B, 1 + 16, D, generator=g)  # one prefix (cls) token
    coords = grid_coords(4, 4)
    out = grid_pool(hidden, 1, None, coords, 2).reshape(B, 4, D)
    maps = hidden[:, 1:].reshape(B, 4, 4, D)
    quads = [maps[:, r : r + 2, c : c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)]
    assert torch.allclose(out, torch.stack(quads, 1), atol=1e-6)
    flat = grid_pool(hidden, 1, None, coords, 4)
    assert torch.allclose(flat, hidden[:, 1:].reshape(B, 16 * D), atol=1e-6)
    # the cls token enters no cell; one cell is the mean pooling
    assert torch.allclose(grid_pool(hidden, 1, None, coords, 1), hidden[:, 1:].mean(1), atol=1e-6)


def test_grid_cells_span_each_samples_own_tokens_and_skip_padding():
    """1-D coordinates, a padded sample: its real tokens alone are cut into the cells."""
    D = 3
    x = torch.arange(1 * 6 * D, dtype=torch.float).reshape(1, 6, D).repeat(2, 1, 1)
    coords = torch.linspace(-1, 1, 6).reshape(6, 1)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = grid_pool(x, 0, valid, coords, 2).reshape(2, 2, D)
    assert torch.allclose(out[0, 0], x[0, :3].mean(0)) and torch.allclose(
        out[0, 1], x[0, 3:].mean(0)
    )
    assert torch.allclose(out[1, 0], x[1, :2].mean(0)) and torch.allclose(
        out[1, 1], x[1, 2:4].mean(0)
    )
    padded = x.clone()
    padded[1, 4:] = 1e6  # whatever sits in the padding changes nothing
    assert torch.equal(grid_pool(padded, 0, valid, coords, 2), grid_pool(x, 0, valid, coords, 2))


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_grid_pooling_works_for_every_tokenizer(name):
    """extract_features(pool='grid') on each tokenizer: cells ** (coordinate axes) x width,
    the same layout for every sample, and it keeps position (a mean pooling cannot)."""
    kw, axes = TOKENIZERS[name]
    torch.manual_seed(0)
    model = NEPA(model_config("nepa_debug", causal=True, **kw))
    x = _input(name)
    batches = [(x, torch.arange(3))]
    width = model.predictor.cfg.dim
    f = extract_features(model, batches, pool="grid", cells=2, layers=True)
    assert f.pooled.shape == (3, 2**axes * width) and torch.isfinite(f.pooled).all()
    assert f.layers.shape == (len(model.predictor.blocks) + 1, 3, 2**axes * width)
    mean = extract_features(model, batches, pool="mean").pooled
    one = extract_features(model, batches, pool="grid", cells=1).pooled
    assert torch.allclose(one, mean, atol=1e-4)  # one cell = the mean over the real tokens
    assert not torch.allclose(f.pooled[:, :width], f.pooled[:, -width:])  # cells differ


@pytest.mark.parametrize("name", ["text", "audio"])
def test_poolings_joined_by_plus_are_concatenated_in_order(name):
    """features.pool=mean+last: the mean of the real tokens, then the last real token (padded
    clips: not the last position), side by side; for the per-layer features too."""
    kw, _ = TOKENIZERS[name]
    torch.manual_seed(0)
    model = NEPA(model_config("nepa_debug", causal=True, **kw))
    batches = [(_input(name), torch.arange(3))]
    width = model.predictor.cfg.dim
    both = extract_features(model, batches, pool="mean+last", layers=True)
    mean = extract_features(model, batches, pool="mean", layers=True)
    last = extract_features(model, batches, pool="last", layers=True)
    assert both.pooled.shape == (3, 2 * width)
    assert torch.equal(both.pooled, torch.cat([mean.pooled, last.pooled], -1))
    assert torch.equal(both.layers, torch.cat([mean.layers, last.layers], -1))
    assert not torch.allclose(mean.pooled, last.pooled)
    # per-sample standardisation (done once for both poolings) reads as each pooling alone
    std = [extract_features(model, batches, pool=p, norm="sample").pooled
           for p in ("last+mean", "last", "mean")]  # fmt: skip
    assert torch.allclose(std[0], torch.cat(std[1:], -1), atol=1e-6)
    with pytest.raises(ProtocolError, match="features.pool=cls"):  # a causal cls is refused
        extract_features(model, batches, pool="mean+cls")


def test_grid_pool_settings_and_the_cli(tmp_path):
    s = parse_eval_settings(["features.pool=grid", "features.grid=3"])
    assert (s.features.pool, s.features.grid) == ("grid", 3)
    with pytest.raises(ProtocolError, match="features.grid=0 must be >= 1"):
        parse_eval_settings(["features.pool=grid", "features.grid=0"])
    with pytest.raises(ProtocolError, match="use mean, last, cls or grid"):
        parse_eval_settings(["features.pool=flat"])
    assert parse_eval_settings(["features.pool=mean+last"]).features.pool == "mean+last"
    for bad in ("mean+flat", "mean+mean", "mean+"):
        with pytest.raises(ProtocolError, match="joined by '\\+'"):
            parse_eval_settings([f"features.pool={bad}"])
    with pytest.raises(ProtocolError, match="features.norm=feature with features.pool=last"):
        parse_eval_settings(["features.pool=last+mean", "features.norm=feature"])


def test_the_eval_cli_reads_out_a_grid_for_the_backbone_and_the_random_baseline(capsys):
    """`unipred eval protocol=knn features.pool=grid`: the backbone's and the random-init
    baseline's features are both grid-pooled (4 cells x width 32 on the tiny image model)."""
    from unipred.cli import main

    tiny = ["model.predictor.dim=32", "model.predictor.depth=2", "model.predictor.heads=2", "eval_defaults.features.block=null",
            "data.root=''", "data.generated_samples=48", "trainer.progress_bar=false",
            "trainer.precision=32-true", "trainer.accelerator=cpu"]  # fmt: skip
    rc = main(["eval", "configs/demo/fmnist_probe.yaml", "ckpt=random", *tiny, "protocol=knn",
               "features.pool=grid", "features.grid=2", "baselines=false"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "grid 2 per axis pooling" in out and "width 128" in out


def test_a_recipes_eval_defaults_set_the_read_out_and_the_command_line_wins(tmp_path, capsys):
    """`eval_defaults: {features: {pool: grid, grid: 2}}` in a recipe: `unipred eval` reads
    out a grid unless the command line says otherwise; a key that is not an eval setting is
    one line, exit 2."""
    from unipred.cli import main

    recipe = tmp_path / "probe.yaml"
    base = "_base_: " + str(_repo() / "configs/demo/fmnist_probe.yaml") + "\n"
    recipe.write_text(base + "eval_defaults: {features: {pool: grid, grid: 2}, knn: {k: 5}}\n")
    tiny = ["model.predictor.dim=32", "model.predictor.depth=2", "model.predictor.heads=2", "eval_defaults.features.block=null",
            "data.root=''", "data.generated_samples=48", "trainer.progress_bar=false",
            "trainer.precision=32-true", "trainer.accelerator=cpu", "baselines=false",
            "ckpt=random", "protocol=knn"]  # fmt: skip
    assert main(["eval", str(recipe), *tiny]) == 0
    out = capsys.readouterr().out
    assert "grid 2 per axis pooling" in out and "width 128" in out and "k=5" in out
    assert main(["eval", str(recipe), *tiny, "features.pool=mean"]) == 0
    out = capsys.readouterr().out
    assert "mean pooling" in out and "width 32" in out and "k=5" in out
    recipe.write_text(base + "eval_defaults: {optim: {lr: 0.1}}\n")
    assert main(["eval", str(recipe), *tiny]) == 2
    assert "eval_defaults: optim.lr is not an eval setting" in capsys.readouterr().err


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent
