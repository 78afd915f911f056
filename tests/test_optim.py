"""Optimizer groups, weight-decay rules, LLRD exponents, freezing and per-group lr schedules,
checked against the formulas of the official release's pretraining and fine-tuning scripts."""

import math

import pytest
import torch

from unipred.nn.model import NEPA
from unipred.train import optim


def _cls_model(depth=4):
    return NEPA.from_name(
        "nepa_debug", depth=depth, head="mean", num_classes=5, qk_norm_affine=True
    )


def _names_by(groups, key):
    out = {}
    for g in groups:
        for n in g["names"]:
            out[n] = g[key]
    return out


def test_weight_decay_rules_follow_the_release():
    model = _cls_model()
    groups = optim.param_groups(model, lr=1e-3, weight_decay=0.05)
    wd = _names_by(groups, "weight_decay")
    assert set(wd) == {n for n, _ in model.named_parameters()}
    decayed = {n for n, v in wd.items() if v > 0}
    for n in wd:
        no_decay = n.endswith(".bias") or "norm" in n or ".ls1." in n or ".ls2." in n
        assert (n not in decayed) == no_decay, n
    # the release decays the 3-D cls token and the patch embedding weight
    assert "cls_token" in decayed and "tokenizer.proj.weight" in decayed
    for n in (
        "predictor.blocks.0.attn.q_norm.weight",
        "predictor.blocks.0.ls1.gamma",
        "predictor.norm.weight",
        "head.fc_norm.weight",
        "head.classifier.bias",
    ):
        assert n in wd and n not in decayed


def test_llrd_exponents_and_head_lr():
    L = 4
    model = _cls_model(L)
    groups = optim.param_groups(model, lr=6e-3, weight_decay=0.05, llrd=0.65, head_lr=1e-3)
    exp, lr = _names_by(groups, "exponent"), _names_by(groups, "lr")
    for i in range(L):
        assert exp[f"predictor.blocks.{i}.attn.qkv.weight"] == L - 1 - i
        assert lr[f"predictor.blocks.{i}.mlp.fc1.weight"] == 6e-3
    assert exp["cls_token"] == L and exp["tokenizer.proj.weight"] == L
    for n in ("head.classifier.weight", "predictor.norm.weight"):
        assert exp[n] == 0 and lr[n] == 1e-3  # head_lr, not batch-scaled
    assert exp["head.fc_norm.weight"] == 0 and lr["head.fc_norm.weight"] == 6e-3
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.65 ** g["exponent"])


def _reference_llrd(t, W, T, f):
    """nepa-recipe.md section 10, written independently of unipred.train.optim."""
    w = max(1, W - round(W * min(f, 1.0)))
    if t < w:
        return f * t / w
    return f * 0.5 * (1 + math.cos(math.pi * (t - w) / (T - w)))


def _reference_cosine(t, W, T):
    if t < W:
        return t / max(1, W)
    return 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))


@pytest.mark.parametrize("schedule", ["llrd_cosine_warmup", "cosine"])
def test_every_group_lr_matches_the_formula(schedule):
    L, base, head_lr, llrd, T = 4, 6e-3, 1e-3, 0.65, 200
    W = optim.warmup_steps(T, 0.2)
    assert W == math.ceil(0.2 * T)
    model = _cls_model(L)
    optim.freeze(model, ["tokenizer.proj.*"])
    groups = optim.param_groups(model, base, 0.05, llrd, head_lr)
    opt = optim.build_adamw(groups, (0.9, 0.999), 1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, optim.schedule_fns(opt.param_groups, schedule, W, T)
    )
    checked = 0
    for t in range(T):
        if t in (0, 1, 5, 17, W - 1, W, W + 1, 100, T - 1):
            for g in opt.param_groups:
                f = llrd ** g["exponent"]
                m = (
                    _reference_llrd(t, W, T, f)
                    if schedule != "cosine"
                    else f * _reference_cosine(t, W, T)
                )
                assert g["lr"] == pytest.approx(g["initial_lr"] * m, rel=1e-9, abs=1e-15), (
                    t,
                    g["names"],
                )
                checked += 1
        opt.step()
        sched.step()
    assert checked >= 9 * 6
    # the top block and the head (f = 1) have a 1-step warmup under the release's schedule
    if schedule == "llrd_cosine_warmup":
        top = [g for g in opt.param_groups if g["exponent"] == 0]
        assert all(max(1, W - round(W * 1.0)) == 1 for _ in top)


def test_freeze_by_pattern_and_unknown_pattern():
    model = _cls_model(2)
    frozen = optim.freeze(model, ["tokenizer.proj.*"])
    assert frozen == ["tokenizer.proj.weight", "tokenizer.proj.bias"]
    names = {n for g in optim.param_groups(model, 1e-3, 0.05) for n in g["names"]}
    assert "tokenizer.proj.weight" not in names and "cls_token" in names
    with pytest.raises(ValueError, match="match no parameter"):
        optim.freeze(model, ["nothing.like.this*"])


def test_fused_adamw_is_used_on_cpu():
    model = _cls_model(2)
    opt = optim.build_adamw(optim.param_groups(model, 1e-3, 0.05), (0.9, 0.95), 1e-8)
    assert opt.defaults.get("fused") is True
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.schedule_fns([{"lr_scale": 1.0}], "linear", 1, 10)


def test_llrd_depth_offset_gives_mmseg_numbering():
    """offset 1 (BEiT/MAE/mmseg): block i -> llrd^(L-i), embeddings -> llrd^(L+1), head -> 1."""
    from unipred import NEPA
    from unipred.train.optim import param_groups

    m = NEPA.from_name("nepa_debug", head="mean", num_classes=3)  # depth 2
    groups = param_groups(m, 1.0, 0.05, llrd=0.5, depth=len(m.predictor.blocks) + 1)
    exp = {n: g["exponent"] for g in groups for n in g["names"]}
    assert exp["predictor.blocks.1.mlp.fc1.weight"] == 1
    assert exp["predictor.blocks.0.mlp.fc1.weight"] == 2
    assert exp["cls_token"] == 3 and exp["tokenizer.proj.weight"] == 3
    assert exp["head.classifier.weight"] == 0


def _lars_reference(p, grads, lr, wd, momentum=0.9, trust=0.001):
    """MAE's LARS rule written out step by step for one 2-D parameter."""
    p, buf = p.clone(), torch.zeros_like(p)
    for g in grads:
        d = g + wd * p
        q = trust * p.norm() / d.norm()
        buf = momentum * buf + q * d
        p = p - lr * buf
    return p


def test_lars_matches_the_rule_and_spares_1d_parameters():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    zero = torch.nn.Parameter(torch.zeros(2, 2))  # ||p|| = 0: trust ratio falls back to 1
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = optim.LARS([{"params": [w, b, zero], "lr": 0.5, "weight_decay": 0.1}])
    gw = [torch.randn(4, 3) for _ in range(3)]
    gb = [torch.randn(4) for _ in range(3)]
    for i in range(3):
        w.grad, b.grad, zero.grad = gw[i], gb[i], torch.ones(2, 2)
        opt.step()
    torch.testing.assert_close(w.detach(), _lars_reference(w0, gw, 0.5, 0.1))
    # biases: plain heavy-ball SGD, no weight decay, no rescaling
    buf, ref = torch.zeros(4), b0.clone()
    for g in gb:
        buf = 0.9 * buf + g
        ref = ref - 0.5 * buf
    torch.testing.assert_close(b.detach(), ref)
    # zero weight: first update is the raw gradient (wd * 0 = 0, q = 1)
    assert torch.isfinite(zero).all() and not torch.equal(zero.detach(), torch.zeros(2, 2))


def test_build_optimizer_picks_lars_and_rejects_unknown_names():
    model = _cls_model(2)
    groups = optim.param_groups(model, 6.4, 0.0)
    assert isinstance(optim.build_optimizer("lars", groups, (0.9, 0.95), 1e-8), optim.LARS)
    with pytest.raises(ValueError, match="optim.name"):
        optim.build_optimizer("sgdx", groups, (0.9, 0.95), 1e-8)
