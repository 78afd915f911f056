"""The timm export is timm's own folder: plain ``timm.create_model("local-dir:EXPORT",
pretrained=True)`` builds it with NEPA's preprocessing and gives unipred's outputs to 1e-5,
although timm builds its LayerNorms with epsilon 1e-5 where NEPA's is 1e-12 (the export folds
the epsilon into the weights, ``unipred.weights.timm_export.fold_norm_eps``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unipred.nn.model import NEPA
from unipred.nn.objectives import ObjectiveConfig
from unipred.weights.hub import export_timm, load_timm, set_layernorm_eps
from unipred.weights.timm_export import timm_state_dict

timm = pytest.importorskip("timm", reason="timm (the 'vision' extra) is not installed")


def _model(**kw):
    torch.manual_seed(0)
    m = NEPA.from_name("nepa_debug", **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _plain_timm(folder):
    """What a timm user types, nothing of unipred involved."""
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_plain_local_dir_matches_unipred_logits(tmp_path, qk_norm):
    m = _model(causal=False, head="mean", num_classes=5, qk_norm=qk_norm)  # patch 4
    folder = export_timm(m, tmp_path / "export", image_size=32)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] and cfg["pretrained_cfg"]["mean"] == [0.5] * 3
    net = _plain_timm(folder)
    assert {x.eps for x in net.modules() if isinstance(x, torch.nn.LayerNorm)} == {1e-5}
    data = timm.data.resolve_model_data_config(net)
    assert tuple(data["mean"]) == tuple(data["std"]) == (0.5, 0.5, 0.5)  # not ImageNet's
    assert tuple(data["input_size"]) == (3, 32, 32) and data["interpolation"] == "bicubic"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        logits = (net(x) - out.logits).abs().max().item()
        f = net.forward_features(x)
        pre = (net.forward_head(f, pre_logits=True) - out.features).abs().max().item()
        s = cfg["unipred"]["residual_scale"]  # the classifier's fc_norm reads s * final norm
        feats = (f / s - m.forward_features(x, causal=False).hidden).abs().max().item()
        # the unfolded weights under timm's epsilon: what the fold removes (about 1e-4 here)
        unfolded = timm.create_model(f"local-dir:{folder}").eval()
        unfolded.load_state_dict(timm_state_dict(m))
        before = (unfolded(x) - out.logits).abs().max().item()
        loaded = load_timm(folder)
        assert not loaded.training
        via_loader = (loaded(x) - out.logits).abs().max().item()
    assert logits < 1e-5 and pre < 1e-5 and via_loader < 1e-5, (logits, pre, via_loader)
    assert feats < 1e-5, feats
    assert before > 1e-5, before  # the test can fail: without the fold timm is off
    print(f"plain timm local-dir vs unipred logits: {logits:.2e} ({before:.2e} unfolded)")


def test_backbone_export_matches_bidirectional_features(tmp_path):
    m = _model()  # a causal pretraining backbone: exported bidirectional
    folder = export_timm(m, tmp_path / "bb", bidirectional=True, image_size=32)
    net = _plain_timm(folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m.forward_features(x, causal=False).hidden
        err = (net.forward_features(x) - want).abs().max()  # no fc_norm: features unscaled
    assert err < 1e-5


def test_a_small_data_pretraining_backbone_exports_without_its_objective_head(tmp_path):
    """The small-image recipe pretrains with an MLP head per horizon step (model.objective.head,
    pretraining-only, under ``objective.*``): the export stopped at "no timm name for
    'objective.heads.0.fc1.weight'". The encoder's features never read it: left out."""
    m = _model(objective=ObjectiveConfig(head="mlp", horizon=2, target_norm="instance"))
    assert any(k.startswith("objective.") for k in m.state_dict())
    folder = export_timm(m, tmp_path / "bb", bidirectional=True, image_size=32)
    net = _plain_timm(folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = (net.forward_features(x) - m.forward_features(x, causal=False).hidden).abs().max()
    assert err < 1e-5


def test_old_export_without_fold_still_loads_exactly(tmp_path):
    """A folder written before the fold (unfolded weights, ``unipred.norm_eps`` only):
    load_timm still sets the epsilon."""
    from safetensors.torch import save_file

    m = _model(causal=False, head="mean", num_classes=5)
    folder = export_timm(m, tmp_path / "old", image_size=32)
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("residual_scale", "timm_norm_eps"):
        del cfg["unipred"][k]
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in timm_state_dict(m).items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = (load_timm(folder)(x) - m(x).logits).abs().max()
        fixed = set_layernorm_eps(_plain_timm(folder), 1e-12)
        assert (fixed(x) - m(x).logits).abs().max() < 1e-5
    assert err < 1e-5


@pytest.mark.slow  # a 1-step fit and two exports, each a fresh process (~30 s idle)
def test_unipred_export_timm_from_a_checkpoint(tmp_path):
    """`unipred export CKPT OUT --timm` as a user runs it: a causal pretraining checkpoint is
    refused in one line naming --bidirectional, then exported; plain timm loads the folder
    with the run's image size and gives the checkpoint's bidirectional features."""
    import os
    import subprocess
    import sys

    from unipred.weights.pretrained import model_from_checkpoint

    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    cli = [sys.executable, "-m", "unipred"]
    run = tmp_path / "run"
    fit = subprocess.run([*cli, "fit", "configs/debug/image_nepa_tiny.yaml", f"run_dir={run}",
                          "trainer.max_steps=1", "trainer.loggers=[]", "data.train_samples=16",
                          "data.val_samples=16"], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt, out = run / "checkpoints" / "last.ckpt", tmp_path / "timm"
    p = subprocess.run([*cli, "export", str(ckpt), str(out), "--timm"], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 2 and "--bidirectional" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([*cli, "export", str(ckpt), str(out), "--timm", "--bidirectional"],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    net = _plain_timm(out)
    assert tuple(timm.data.resolve_model_data_config(net)["input_size"]) == (3, 32, 32)
    m = model_from_checkpoint(ckpt)[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = (net.forward_features(x) - m.forward_features(x, causal=False).hidden).abs().max()
    assert err < 1e-5, err
