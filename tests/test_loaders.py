"""Every loader returns the model in eval mode (``unipred.weights.pretrained.for_inference``): released
folders, our folders, a Hub repo id, torch.hub (random and pretrained), checkpoints read for
inference. Per path: no module is left training and two calls on one input agree; the
official-code fixture matches to 1e-5 as loaded, without calling ``.eval()``. torch.hub
imports only from the checkout its hubconf.py sits in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unipred.nn.model import NEPA
from unipred.weights.hub import load_official_nepa

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "nepa_ref"
META = json.loads((FIX / "meta.json").read_text())
IO = load_file(str(FIX / "io.safetensors"))


def official_folder(tmp_path: Path, kind: str) -> Path:
    """The fixture's weights as a released folder: config.json + model.safetensors."""
    folder = tmp_path / f"official_{kind}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(META[f"{kind}_model"]["config_full"]))
    shutil.copy(FIX / f"{kind}_model.safetensors", folder / "model.safetensors")
    return folder


def assert_inference_ready(model, x):
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    assert not training, f"modules left in train mode: {training[:5]}"
    with torch.no_grad():
        a, b = model.forward_features(x).hidden, model.forward_features(x).hidden
    assert torch.equal(a, b), "two calls on one input differ"


def test_official_folder_matches_the_official_code_as_loaded(tmp_path):
    x = IO["pixel_values"]
    pre = official_folder(tmp_path, "pretrain")
    cls = official_folder(tmp_path, "cls")
    for load in (load_official_nepa, NEPA.from_pretrained):
        m = load(pre)  # no .eval(): the loader's rule
        assert_inference_ready(m, x)
        with torch.no_grad():
            err = (m.forward_features(x).hidden - IO["last_hidden_state_causal"]).abs().max()
            assert err < 1e-5, f"{load.__name__}: {err:.3g}"
        c = load(cls)
        assert_inference_ready(c, x)
        with torch.no_grad():
            err = (c(x).logits - IO["cls_logits"]).abs().max()
        assert err < 1e-5, f"{load.__name__}: logits off by {err:.3g}"


def _perturbed(name="nepa_debug", **kw):
    torch.manual_seed(0)
    m = NEPA.from_name(name, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_own_folder_and_hub_repo_id(tmp_path):
    m = _perturbed(rope_rescale=2.0, drop_path=0.2)
    folder = m.save_pretrained(tmp_path / "m")
    x = m.tokenizer.example_input(2)
    assert_inference_ready(NEPA.from_pretrained(folder), x)
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    hub = NEPA.from_pretrained("someone/tiny", cache_dir=tmp_path / "hub", local_files_only=True)
    assert_inference_ready(hub, x)


def test_torch_hub_entries_random_and_pretrained(tmp_path):
    x = torch.randn(1, 3, 28, 28)
    rand = torch.hub.load(str(ROOT), "nepa", source="local", name="nepa_debug")
    assert_inference_ready(rand, torch.randn(1, 3, 32, 32))
    b14 = torch.hub.load(str(ROOT), "nepa_vit_b14", source="local")
    assert not any(m.training for m in b14.modules())
    official = official_folder(tmp_path, "pretrain")
    pre = torch.hub.load(str(ROOT), "nepa", source="local", pretrained=str(official))
    assert_inference_ready(pre, IO["pixel_values"])
    del x


def test_torch_hub_named_entry_refuses_another_architecture(tmp_path):
    folder = _perturbed().save_pretrained(tmp_path / "debug")
    with pytest.raises(ValueError, match=r"is not a nepa_vit_b14 model: dim 64 \(not 768\)"):
        torch.hub.load(str(ROOT), "nepa_vit_b14", source="local", pretrained=str(folder))


def test_checkpoint_read_for_inference(tmp_path):
    from unipred.train.config import load_config
    from unipred.train.engine import fit
    from unipred.weights.pretrained import model_from_checkpoint

    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/debug/image_nepa_tiny.yaml", [
        f"run_dir={run}", "trainer.max_steps=1", "trainer.progress_bar=false",
        "trainer.loggers=[]", "data.train_samples=16", "data.val_samples=0",
        "trainer.collapse_every_n_steps=0", "model.predictor.drop_path=0.3"])  # fmt: skip
    fit(cfg)
    for ema in (False, True):
        model, _, _ = model_from_checkpoint(run / "checkpoints/last.ckpt", ema=ema)
        assert_inference_ready(model, torch.randn(2, 3, 32, 32))


@pytest.mark.slow  # fresh interpreters on a copy of the source tree
def test_torch_hub_imports_only_from_its_checkout(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    for f in [*files.stdout.split(), "hubconf.py"]:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, src / f)
    load = f"import torch; m = torch.hub.load({str(src)!r}, 'nepa', source='local', name='nepa_debug')\n"
    # the editable unipred of this venv is importable, yet the copy is what runs
    code = load + ("import unipred, unipred.tokenizers.image as t, unipred.nn.model as mm\n"
                   "print(unipred.__file__, t.__file__, mm.__file__, m.training)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert all(f.startswith(str(src)) for f in files[:3]), files
    assert files[3] == "False"
    # another unipred already imported: one line, nothing mixed
    out = subprocess.run([sys.executable, "-c", "import unipred.nn.model\n" + load],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert out.returncode != 0
    assert "cannot run with the unipred already imported" in out.stderr.strip().splitlines()[-1]
