"""Every registered model size builds with the official parameter counts and trains on CPU."""

import pytest
import torch

from unipred import NEPA
from unipred.base.registry import MODELS

OFFICIAL = {
    "nepa_vit_b14": 85_527_552,
    "nepa_vit_b14_cls": 86_299_624,
    "nepa_vit_l14": 302_967_808,
    "nepa_vit_l14_cls": 303_994_856,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_parameter_counts(name):
    with torch.device("meta"):
        m = NEPA.from_name(name)
    assert sum(p.numel() for p in m.parameters()) == OFFICIAL[name]


def _forward_backward(name, **overrides):
    torch.manual_seed(0)
    m = NEPA.from_name(name, **overrides)
    out = m(m.tokenizer.example_input(2))  # each tokenizer's smallest valid batch
    loss = out.loss if m.head is None else out.logits.logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [q.grad for q in m.parameters() if q.requires_grad]
    assert all(g is not None for g in grads)


# the ViT-L sizes (300M parameters, ~12 s each here) run 2 of their blocks in the default suite:
# width, heads, tokenizer and head as named; every block in the slow test below
LARGE = {n for n in MODELS.names() if "_l14" in n}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_size_runs_forward_backward(name):
    _forward_backward(name, **({"depth": 2} if name in LARGE else {}))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGE))
def test_every_large_size_runs_forward_backward_at_full_depth(name):
    _forward_backward(name)


def test_overrides_and_unknown_option():
    m = NEPA.from_name("nepa_debug", depth=3, num_classes=5, head="mean")
    assert len(m.predictor.blocks) == 3 and m.head.classifier.out_features == 5
    with pytest.raises(TypeError, match="deptth"):
        NEPA.from_name("nepa_debug", deptth=3)
    with pytest.raises(KeyError, match="did you mean"):
        NEPA.from_name("nepa_vit_b15")
