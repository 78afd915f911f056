"""The timm export is timm's own folder: ``timm.create_model("local-dir:EXPORT",
pretrained=True)`` builds it with NEPA's preprocessing, and with the export's LayerNorm
epsilon (``unipred.weights.hub.load_timm``) it gives unipred's outputs to 1e-5."""

from __future__ import annotations

import json

import pytest
import torch

from unipred.nn.model import NEPA
from unipred.weights.hub import export_timm, load_timm, set_layernorm_eps

timm = pytest.importorskip("timm", reason="timm (the 'vision' extra) is not installed")


def _model(**kw):
    torch.manual_seed(0)
    m = NEPA.from_name("nepa_debug", **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_local_dir_builds_with_nepa_preprocessing_and_matches(tmp_path):
    m = _model(causal=False, head="mean", num_classes=5)  # patch 4
    folder = export_timm(m, tmp_path / "export", image_size=32)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] and cfg["pretrained_cfg"]["mean"] == [0.5] * 3
    net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data = timm.data.resolve_model_data_config(net)
    assert tuple(data["mean"]) == tuple(data["std"]) == (0.5, 0.5, 0.5)  # not ImageNet's
    assert tuple(data["input_size"]) == (3, 32, 32) and data["interpolation"] == "bicubic"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m(x).logits
        plain = (net(x) - want).abs().max().item()  # timm's own LayerNorm eps (1e-5)
        set_layernorm_eps(net, cfg["unipred"]["norm_eps"])
        fixed = (net(x) - want).abs().max().item()
        loaded = load_timm(folder)
        assert not loaded.training
        via_loader = (loaded(x) - want).abs().max().item()
    assert fixed < 1e-5 and via_loader < 1e-5, (fixed, via_loader)
    print(f"timm local-dir vs unipred logits: {plain:.2e} as built, {fixed:.2e} with norm_eps")


def test_backbone_export_matches_bidirectional_features(tmp_path):
    m = _model()  # a causal pretraining backbone: exported bidirectional
    folder = export_timm(m, tmp_path / "bb", bidirectional=True, image_size=32)
    net = load_timm(folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = (net.forward_features(x) - m.forward_features(x, causal=False).hidden).abs().max()
    assert err < 1e-5
