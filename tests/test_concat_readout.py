"""features.concat: the pooled outputs of chosen blocks appended to the read-out."""

from __future__ import annotations

import pytest
import torch

from unipred.nn.heads import pool_tokens
from unipred.nn.model import NEPA
from unipred.protocols import ProtocolError, extract_features, parse_eval_settings


def _model_and_batches():
    torch.manual_seed(0)
    model = NEPA.from_name("nepa_debug", depth=3)
    x = torch.randn(4, 3, 28, 28)
    return model, x, [(x, torch.tensor([0, 1, 0, 1]))]


def test_concat_appends_each_block_after_the_final_norm_in_the_order_given():
    model, x, batches = _model_and_batches()
    f = extract_features(model, batches, concat=(2, 0))
    out = model.eval().forward_features(x, layers=(0, 2))
    d = out.hidden.shape[-1]
    assert f.pooled.shape == (4, 3 * d)
    want = [out.hidden, out.layers[1], out.layers[0]]  # final norm, block 2, block 0
    for i, h in enumerate(want):
        assert torch.allclose(f.pooled[:, i * d : (i + 1) * d], pool_tokens(h, 1, None, "mean"),
                              atol=1e-5)  # fmt: skip
    # negative indices count from the top, as features.block does
    assert torch.allclose(extract_features(model, batches, concat=(-1, -3)).pooled, f.pooled)


def test_concat_with_a_block_read_out_and_a_grid():
    model, x, batches = _model_and_batches()
    f = extract_features(model, batches, block=1, concat=(0,), pool="grid", cells=2)
    one = extract_features(model, batches, block=1, pool="grid", cells=2).pooled
    assert f.pooled.shape[1] == 2 * one.shape[1]
    assert torch.allclose(f.pooled[:, : one.shape[1]], one, atol=1e-6)
    assert not torch.allclose(f.pooled[:, one.shape[1] :], one)


def test_a_block_the_backbone_lacks_is_one_clear_error_and_the_setting_parses():
    model, _, batches = _model_and_batches()
    with pytest.raises(ProtocolError, match="features.concat=3: the backbone has 3 blocks"):
        extract_features(model, batches, concat=(0, 3))
    assert parse_eval_settings(["features.concat=0,1"]).features.concat == [0, 1]
    assert parse_eval_settings(["features.concat=[-1]"]).features.concat == [-1]
    assert parse_eval_settings([]).features.concat == []


def test_the_text_probe_recipe_reads_out_concatenated_blocks_and_the_command_line_wins(capsys):
    """configs/text/probe.yaml's eval_defaults append every block below the top one (blocks
    0-2 of nepa_text_tiny's 4: 4 x 128 wide) to the mean; `features.concat_below=false` on the
    command line gives the plain mean (128 wide)."""
    from unipred.cli import main

    tiny = ["data.corpus=''", "data.labels_per_class=4", "trainer.progress_bar=false",
            "ckpt=random", "protocol=knn", "baselines=false", "data.num_workers=0"]  # fmt: skip
    assert main(["eval", "text/probe", *tiny]) == 0
    out = capsys.readouterr().out
    assert "final norm + blocks [0, 1, 2], mean pooling" in out and "width 512" in out
    assert main(["eval", "text/probe", *tiny, "features.concat_below=false"]) == 0
    out = capsys.readouterr().out
    assert "(final norm, mean pooling)" in out and "width 128" in out


def test_concat_below_appends_every_block_but_the_top_one_for_any_depth():
    """features.concat_below fits any depth: [0 .. depth-2]; with features.concat both, each
    block once (-1 and depth-1 are the same block)."""
    from types import SimpleNamespace

    from unipred.protocols.suite import concat_blocks

    def fs(concat=(), below=True):
        return SimpleNamespace(concat=list(concat), concat_below=below)

    for depth, want in ((1, ()), (2, (0,)), (4, (0, 1, 2)), (12, tuple(range(11)))):
        model = SimpleNamespace(predictor=SimpleNamespace(blocks=[None] * depth))
        assert concat_blocks(fs(), model) == want
    four = SimpleNamespace(predictor=SimpleNamespace(blocks=[None] * 4))
    assert concat_blocks(fs((-1, 1)), four) == (3, 1, 0, 2)
    assert concat_blocks(fs((0, 2), below=False), four) == (0, 2)
    assert concat_blocks(fs((7,), below=False), four) == (7,)  # left for extract's clear error
    assert parse_eval_settings(["features.concat_below=true"]).features.concat_below is True
