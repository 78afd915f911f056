"""Weights that travel: save_pretrained / from_pretrained / push_to_hub (every modality), the
Hub cache offline, model cards, the official layout's refusals, timm export, torch.hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unipred.nn.model import NEPA
from unipred.weights.hub import save_official_nepa, to_timm
from unipred.weights.pretrained import PretrainedError

ROOT = Path(__file__).resolve().parents[1]


def _perturbed(name, **kw):
    torch.manual_seed(0)
    m = NEPA.from_name(name, **kw)
    with torch.no_grad():  # away from the init, so a missed tensor shows
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("name", ["nepa_debug", "nepa_audio_debug", "nepa_video_debug"])
def test_save_and_load_every_modality(tmp_path, name):
    m = _perturbed(name, num_classes=3, head="mean")
    folder = m.save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tokenizer"] == m.cfg.tokenizer and cfg["format"] == "unipred-nepa"
    back = NEPA.from_pretrained(folder)
    assert back.cfg == m.cfg
    for (k, a), (k2, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = m.tokenizer.example_input(2)
    with torch.no_grad():
        assert torch.equal(m(x).logits, back(x).logits)


def test_model_card_has_config_recipe_and_evaluation(tmp_path):
    m = _perturbed("nepa_debug")
    ev = {"rows": [{"protocol": "knn", "weights": "ema", "top1": 0.5, "top5": 0.9, "k": 20,
                    "temperature": 0.07}], "meta": {"config": "c.yaml"}}  # fmt: skip
    m.save_pretrained(tmp_path, training_config="task: fmnist_pretrain\nseed: 1\n",
                      recipe={"lr": 0.003, "total_steps": 10}, evaluation=ev, weights="ema")  # fmt: skip
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: unipred")
    assert "task: fmnist_pretrain" in card and "| total_steps | 10 |" in card
    assert "| knn | ema | 50.00 % | 90.00 % | k=20, T=0.07 |" in card


def _hub_cache(tmp_path, folder, repo="someone/nepa-tiny", sha="0" * 40):
    """The Hub cache layout: models--org--name/{refs/main, snapshots/<sha>/files}."""
    base = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / sha
    shutil.copytree(folder, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)
    return tmp_path / "hub"


@pytest.mark.slow  # a fresh interpreter (HF_HUB_OFFLINE is read at import): 10-25 s here
def test_repo_id_loads_from_the_hub_cache_offline(tmp_path):
    m = _perturbed("nepa_audio_debug")
    cache = _hub_cache(tmp_path, m.save_pretrained(tmp_path / "m"))
    code = (
        "import sys, torch; from unipred import NEPA\n"
        "m = NEPA.from_pretrained('someone/nepa-tiny')\n"
        "print(sum(float(v.double().sum()) for v in m.state_dict().values()))\n"
        "try:\n    NEPA.from_pretrained('someone/absent')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    total, err = out.stdout.strip().splitlines()
    want = sum(float(v.double().sum()) for v in m.state_dict().values())
    assert abs(float(total) - want) < 1e-6 * max(1, abs(want))
    assert err.startswith("PretrainedError") and "someone/absent" in err and "offline" in err


def test_cache_dir_and_local_files_only_in_process(tmp_path):
    m = _perturbed("nepa_video_debug")
    cache = _hub_cache(tmp_path, m.save_pretrained(tmp_path / "m"), repo="a/b")
    back = NEPA.from_pretrained("a/b", cache_dir=cache, local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 back.state_dict().values()))  # fmt: skip


def test_bad_folders_name_the_problem(tmp_path):
    m = _perturbed("nepa_debug")
    folder = m.save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tokenizer"] = "spectrogram_v9"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match="spectrogram_v9"):
        NEPA.from_pretrained(folder)
    cfg["tokenizer"] = "image"
    cfg["predictor"]["wings"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match="wings"):
        NEPA.from_pretrained(folder)
    with pytest.raises(PretrainedError, match="not a model folder"):
        NEPA.from_pretrained(tmp_path / "nothing" / "here")


def test_push_to_hub_uploads_a_loadable_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw.get("private"))

    def upload_folder(self, *, repo_id, folder_path, **kw):  # instead of the network
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["model"] = NEPA.from_pretrained(folder_path)
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    m = _perturbed("nepa_debug")
    assert m.push_to_hub("me/nepa", private=True) == "commit"
    assert calls["create"] == ("me/nepa", True)
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 calls["model"].state_dict().values()))  # fmt: skip


def test_official_layout_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="tokenizer is 'audio'.*save_pretrained"):
        save_official_nepa(NEPA.from_name("nepa_audio_debug"), tmp_path / "a")
    with pytest.raises(ValueError, match="tokenizer is 'video'"):
        save_official_nepa(NEPA.from_name("nepa_video_debug"), tmp_path / "v")
    with pytest.raises(ValueError, match="head 'probe'"):
        save_official_nepa(NEPA.from_name("nepa_debug", head="probe", num_classes=3), tmp_path)
    assert not (tmp_path / "a").exists()
    save_official_nepa(NEPA.from_name("nepa_debug"), tmp_path / "ok")  # an image model is fine


def test_official_folder_loads_through_from_pretrained(tmp_path):
    m = _perturbed("nepa_debug")
    save_official_nepa(m, tmp_path / "o", image_size=32)
    back = NEPA.from_pretrained(tmp_path / "o")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 back.state_dict().values()))  # fmt: skip


@pytest.mark.parametrize(
    "kw",
    [
        {},  # GELU, affine QK-norm, LayerScale
        {"mlp": "swiglu", "qk_norm_affine": False, "layerscale": None},
        {"qk_norm": False, "qkv_bias": False},
    ],
)
@torch.no_grad()
def test_timm_export_matches_where_it_maps(kw):
    m = _perturbed("nepa_debug", causal=False, **kw)
    t = to_timm(m)
    x = torch.randn(2, 3, 32, 48)  # not square: the RoPE axes must line up
    assert (m.forward_features(x).hidden - t.forward_features(x)).abs().max() < 1e-4


@torch.no_grad()
def test_timm_export_of_a_classifier_and_refusals():
    m = _perturbed("nepa_debug", causal=False, head="mean", num_classes=5)
    x = torch.randn(2, 3, 16, 16)
    assert (m(x).logits - to_timm(m)(x)).abs().max() < 1e-4
    causal = _perturbed("nepa_debug")
    with pytest.raises(ValueError, match="causal"):
        to_timm(causal)
    t = to_timm(causal, bidirectional=True)  # its bidirectional forward, as fine-tuning reads it
    want = causal.forward_features(x, causal=False).hidden
    assert (want - t.forward_features(x)).abs().max() < 1e-4
    for bad, why in [({"mlp": "geglu"}, "geglu"), ({"head": "last", "num_classes": 2}, "last")]:
        with pytest.raises(ValueError, match=why):
            to_timm(NEPA.from_name("nepa_debug", causal=False, **bad))
    with pytest.raises(ValueError, match="audio"):
        to_timm(NEPA.from_name("nepa_audio_debug", causal=False))


def test_torch_hub_load_from_the_source_tree(tmp_path):
    m = _perturbed("nepa_debug")
    m.save_pretrained(tmp_path / "m")
    back = torch.hub.load(str(ROOT), "nepa", source="local", pretrained=str(tmp_path / "m"))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 back.state_dict().values()))  # fmt: skip
    fresh = torch.hub.load(str(ROOT), "nepa", source="local", name="nepa_debug", depth=3)
    assert len(fresh.predictor.blocks) == 3


@pytest.mark.slow  # a fresh interpreter on a copy of the source tree
def test_torch_hub_load_from_a_bare_source_tree(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    for f in [*files.stdout.split(), "hubconf.py"]:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, src / f)
    code = (
        "import sys\n"  # hide the installed (editable) unipred: only the copy can be found
        "sys.meta_path = [f for f in sys.meta_path if 'ditable' not in repr(f)]\n"
        f"import torch; m = torch.hub.load({str(src)!r}, 'nepa', source='local', "
        "name='nepa_audio_debug')\n"
        "import unipred.tokenizers.audio as a; print(a.__file__, type(m.tokenizer).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(src / "tokenizers" / "audio.py"), "AudioSpectrogramTokenizer"]
