"""Exact parity with the official NEPA release, on the fixture it produced (tests/fixtures/nepa_ref)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unipred.nn.model import NEPA
from unipred.weights.hub import config_from_official, official_to_ours

FIX = Path(__file__).parent / "fixtures" / "nepa_ref"
META = json.loads((FIX / "meta.json").read_text())
IO = load_file(str(FIX / "io.safetensors"))
ATOL = 1e-5


def _model(kind: str) -> NEPA:
    hf = META[f"{kind}_model"]["config_full"]
    sd = load_file(str(FIX / f"{kind}_model.safetensors"))
    cfg = config_from_official(hf, has_head=kind == "cls")
    model = NEPA(cfg)
    ours, missing = official_to_ours(sd, cfg)
    assert not missing
    model.load_state_dict(ours, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def pre():
    return _model("pretrain")


@pytest.fixture(scope="module")
def cls():
    return _model("cls")


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err < ATOL, f"max abs error {err:.3g}"


def test_param_counts_match_official(pre, cls):
    assert sum(p.numel() for p in pre.parameters()) == META["param_counts"]["pretrain_model"]
    assert sum(p.numel() for p in cls.parameters()) == META["param_counts"]["cls_model"]


@torch.no_grad()
def test_pretrain_outputs(pre):
    x = IO["pixel_values"]
    out = pre.forward_features(x, layers=(0, 1))
    close(out.inputs, IO["input_embedding"])
    close(out.layers[0], IO["block_output_causal.0"])
    close(out.layers[1], IO["block_output_causal.1"])
    close(out.hidden, IO["last_hidden_state_causal"])
    res = pre(x)
    close(res.predictions, IO["last_hidden_state_causal"])
    close(res.targets, IO["input_embedding"])
    assert abs(res.loss.item() - IO["pretrain_loss"].item()) < ATOL


@torch.no_grad()
def test_bidirectional_outputs(cls):
    x = IO["pixel_values"]
    out = cls.forward_features(x, layers=(0, 1))
    close(out.inputs, IO["input_embedding_bidirectional_model"])
    close(out.layers[0], IO["block_output_bidirectional.0"])
    close(out.layers[1], IO["block_output_bidirectional.1"])
    close(out.hidden, IO["last_hidden_state_bidirectional"])
    res = cls(x)
    close(res.features, IO["pooled_after_fc_norm"])
    close(res.logits, IO["cls_logits"])


@torch.no_grad()
def test_loss_on_bidirectional_backbone(pre):
    from unipred.nn.loss import next_embedding_loss

    x = IO["pixel_values"]
    out = pre.forward_features(x, causal=False)
    loss = next_embedding_loss(out.hidden, out.inputs)
    assert abs(loss.item() - IO["pretrain_loss_if_bidirectional"].item()) < ATOL


def test_rope_tables(pre):
    rope = pre.predictor.rope.eval()
    coords = pre.tokenizer.coords(4, 4, "cpu")
    cos, sin = rope.tables(coords)
    close(cos, IO["rope_cos"])
    close(sin, IO["rope_sin"])


@torch.no_grad()
def test_eager_attention_path_matches_sdpa(pre, cls):
    x = IO["pixel_values"]
    for m, ref in ((pre, "last_hidden_state_causal"), (cls, "last_hidden_state_bidirectional")):
        out = m.forward_features(x, return_attn=True)
        close(out.hidden, IO[ref])
        assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 17, 17)
