"""trainer.compile: what ``auto`` chooses, the config check, and that the predictor's blocks
compiled one by one ("regional" compilation) compute what the eager model computes."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unipred.nn.model import NEPA
from unipred.train import compiling
from unipred.train.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"


def _stub(width: int, depth: int = 2) -> nn.Module:
    """A model with a predictor of ``width`` (only what ``choose`` reads)."""
    model = nn.Module()
    model.predictor = nn.Module()
    model.predictor.cfg = SimpleNamespace(dim=width)
    model.predictor.blocks = nn.ModuleList(nn.Identity() for _ in range(depth))
    return model


def test_auto_compiles_wide_predictors_on_cpu_only():
    vit_b = _stub(768)
    assert compiling.choose("auto", "cpu", vit_b, None)[0] == "blocks"
    assert compiling.choose("auto", "cpu", vit_b, 10_000)[0] == "blocks"
    mode, why = compiling.choose("auto", "cpu", _stub(128), None)  # the demo's width
    assert mode == "off" and "width 128" in why
    assert compiling.choose("auto", "cpu", vit_b, 20)[0] == "off"  # too short to pay back
    # fp32 measured no faster compiled on the idle machine: auto compiles bf16 runs only
    assert compiling.choose("auto", "cpu", vit_b, None, precision="bf16-mixed")[0] == "blocks"
    mode, why = compiling.choose("auto", "cpu", vit_b, None, precision="32-true")
    assert mode == "off" and "precision 32-true" in why
    assert compiling.choose("true", "cpu", vit_b, None, precision="32-true")[0] == "whole"
    assert compiling.choose("auto", "cuda", vit_b, None)[0] == "off"  # GPUs: as before
    assert compiling.choose("auto", "cpu", vit_b, None, training=False)[0] == "off"
    assert compiling.choose("auto", "cpu", nn.Linear(2, 2), None)[0] == "off"
    # explicit settings win everywhere; YAML booleans arrive as "True" / "False"
    assert compiling.choose("True", "cuda", vit_b, None)[0] == "whole"
    assert compiling.choose(False, "cpu", vit_b, None)[0] == "off"
    assert compiling.choose("blocks", "cuda", _stub(64), 3)[0] == "blocks"
    assert compiling.choose("blocks", "cpu", nn.Linear(2, 2), None)[0] == "whole"
    with pytest.raises(ValueError, match="trainer.compile must be one of"):
        compiling.normalise("fast")


def test_describe_says_what_was_chosen_and_the_cache():
    line = compiling.describe("blocks", "trainer.compile=auto: CPU", _stub(768, depth=12))
    assert "each of the 12 blocks" in line and "cache" in line
    assert compiling.describe("off", "why", _stub(64)).startswith("eager (not compiled): why")


def test_config_refuses_an_unknown_compile_setting_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.compile must be one of .*'fast'"):
        load_config(TINY, [f"run_dir={tmp_path}", "trainer.compile=fast"], check_paths=False)
    cfg = load_config(TINY, [f"run_dir={tmp_path}", "trainer.compile=true"], check_paths=False)
    assert compiling.normalise(cfg.trainer.compile) == "true"
    assert compiling.normalise(load_config(TINY, [], check_paths=False).trainer.compile) == "auto"


def _model(depth=3):
    torch.manual_seed(0)
    model = NEPA.from_name("nepa_debug", depth=depth)
    model.train()
    # LayerScale starts at 1e-5: widen it so every block visibly shapes the output
    for blk in model.predictor.blocks:
        blk.ls1.gamma.data.fill_(0.5)
        blk.ls2.gamma.data.fill_(0.5)
    return model


def _loss_and_grads(model, x, bf16=False):
    torch.manual_seed(1)  # the same RoPE augmentation draws for both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _close(a, b, rtol):
    la, ga = a
    lb, gb = b
    scale = la.abs().clamp_min(1e-6)
    if ((la - lb).abs() / scale) > rtol or ga.keys() != gb.keys():
        return False
    return all((ga[n] - gb[n]).norm() <= rtol * ga[n].norm().clamp_min(1e-12) for n in ga)


def test_compiled_blocks_share_one_graph_and_read_live_weights():
    """Dynamo only (``aot_eager``: the graphs run as aten ops, exact): every block reuses the
    first block's compilation, and a weight changed after compiling is seen (no stale copy)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _model()
    comp = copy.deepcopy(eager)
    compiling.apply(comp, "blocks", backend="aot_eager")
    x = torch.randn(2, 3, 16, 16)
    assert _close(_loss_and_grads(eager, x), _loss_and_grads(comp, x), 1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for the 3 blocks
    assert list(comp.state_dict()) == list(eager.state_dict())  # checkpoints unchanged
    # a broken variant fails: weights that differ give a different loss
    with torch.no_grad():
        comp.predictor.blocks[1].ls2.gamma.mul_(3.0)
    assert not _close(_loss_and_grads(eager, x), _loss_and_grads(comp, x), 1e-3)
    with torch.no_grad():
        eager.predictor.blocks[1].ls2.gamma.mul_(3.0)
    assert _close(_loss_and_grads(eager, x), _loss_and_grads(comp, x), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_inductor_compiled_blocks_match_eager(bf16):
    """What trainer.compile=auto runs on CPU (inductor), against eager: loss and every
    parameter's gradient within fp32 / bf16 rounding."""
    torch._dynamo.reset()
    eager = _model(depth=2)
    comp = copy.deepcopy(eager)
    compiling.apply(comp, "blocks")
    x = torch.randn(2, 3, 16, 16)
    rtol = 2e-2 if bf16 else 1e-4
    ref = _loss_and_grads(eager, x, bf16)
    assert _close(ref, _loss_and_grads(comp, x, bf16), rtol)
    with torch.no_grad():  # and a model that differs is told apart at that tolerance
        comp.predictor.blocks[0].attn.qkv.weight.mul_(1.5)
    assert not _close(ref, _loss_and_grads(comp, x, bf16), rtol)


def test_fit_says_in_one_line_what_it_compiled(tmp_path, capsys):
    from unipred.train.engine import fit

    over = ["trainer.progress_bar=false", "trainer.loggers=[csv]", "data.image_size=16",
            "data.train_samples=16", "data.val_samples=8", "trainer.global_batch=8",
            "model.predictor.rope_rescale=0", "trainer.fast_dev_run=1"]  # fmt: skip
    fit(load_config(TINY, [f"run_dir={tmp_path}", *over]))
    out = capsys.readouterr().out
    assert "[unipred] eager (not compiled): trainer.compile=auto: predictor width 64 < 512" in out
