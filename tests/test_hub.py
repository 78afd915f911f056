"""Official checkpoint folders: every config option, both checkpoint kinds, exact round trip."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unipred.nn.model import NEPA
from unipred.weights.hub import CheckpointKeyError, load_official_nepa, save_official_nepa

FIX = Path(__file__).parent / "fixtures" / "nepa_ref"
META = json.loads((FIX / "meta.json").read_text())
IO = load_file(str(FIX / "io.safetensors"))


def _folder(tmp_path, kind, as_bin=False):
    d = tmp_path / kind
    d.mkdir()
    cfg = dict(META[f"{kind}_model"]["config_full"])
    cfg["architectures"] = [
        "ViTNepaForPreTraining" if kind == "pretrain" else "ViTNepaForImageClassification"
    ]
    (d / "config.json").write_text(json.dumps(cfg))
    if as_bin:
        torch.save(load_file(str(FIX / f"{kind}_model.safetensors")), d / "pytorch_model.bin")
    else:
        shutil.copy(FIX / f"{kind}_model.safetensors", d / "model.safetensors")
    return d


@pytest.mark.parametrize("as_bin", [False, True])
@torch.no_grad()
def test_load_official_folders(tmp_path, as_bin):
    pre = load_official_nepa(_folder(tmp_path, "pretrain", as_bin)).eval()
    cls = load_official_nepa(_folder(tmp_path, "cls", as_bin)).eval()
    assert pre.head is None and cls.cfg.head == "mean" and cls.cfg.num_classes == 10
    assert pre.cfg.predictor.causal and not cls.cfg.predictor.causal
    x = IO["pixel_values"]
    assert (pre(x).loss - IO["pretrain_loss"]).abs() < 1e-5
    assert (cls(x).logits - IO["cls_logits"]).abs().max() < 1e-5


def test_round_trip_is_exact(tmp_path):
    src = _folder(tmp_path, "cls")
    model = load_official_nepa(src)
    out = save_official_nepa(model, tmp_path / "out", image_size=56)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    again = load_official_nepa(out)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_missing_and_unknown_keys_are_listed(tmp_path):
    d = _folder(tmp_path, "pretrain")
    sd = load_file(str(d / "model.safetensors"))
    del sd["vit_nepa.encoder.layer.1.output.dense.bias"]
    sd["vit_nepa.encoder.layer.1.surprise"] = torch.zeros(1)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointKeyError) as e:
        load_official_nepa(d)
    msg = str(e.value)
    assert "layer.1.output.dense.bias" in msg and "layer.1.surprise" in msg


def test_corrupt_file_names_the_file(tmp_path):
    d = _folder(tmp_path, "pretrain")
    (d / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_official_nepa(d)


@pytest.mark.parametrize(
    "changes",
    [
        {"use_gated_mlp": True, "hidden_act": "silu"},
        {"qk_norm_affine": False},
        {"qk_norm": False},
        {"layerscale_value": None},
        {"add_pooling_layer": False},
        {"qkv_bias": False, "is_causal": False},
    ],
)
def test_every_official_option_round_trips(tmp_path, changes):
    """Build a model from a modified official config, save it, reload it, same outputs."""
    from unipred.weights.hub import config_from_official

    hf = dict(META["cls_model"]["config_full"], **changes)
    torch.manual_seed(0)
    model = NEPA(config_from_official(hf, has_head=True)).eval()
    for p in model.parameters():  # make every parameter matter
        p.data.normal_(0, 0.2)
    out = save_official_nepa(model, tmp_path / "m", image_size=56)
    keys = set(load_file(str(out / "model.safetensors")))
    if changes.get("use_gated_mlp"):
        assert "vit_nepa.encoder.layer.0.intermediate.gate_proj.weight" in keys
    if changes.get("add_pooling_layer") is False:
        assert "fc_norm.weight" not in keys and model.cfg.head == "last"
    if changes.get("layerscale_value", 1) is None:
        assert not any("lambda1" in k for k in keys)
    again = load_official_nepa(out).eval()
    x = torch.randn(2, 3, 70, 42)  # any grid size divisible by the patch
    with torch.no_grad():
        assert torch.allclose(model(x).logits, again(x).logits, atol=1e-6)


def test_official_b_and_l_configs_give_official_param_counts():
    from unipred.weights.hub import config_from_official

    base = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "qk_norm": True, "qk_norm_affine": False,
            "layerscale_value": 1e-5, "patch_size": 14}  # fmt: skip
    # build only the configs (the tensors are allocated lazily on the meta device)
    with torch.device("meta"):
        b = NEPA(config_from_official(base, has_head=False))
    assert sum(p.numel() for p in b.parameters()) == 85_527_552
