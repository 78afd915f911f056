"""The objective switches (model.objective, model.registers): each changes what it should and
nothing else, for every modality; the default is the release's loss, bit for bit."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from unipred.base.registry import TOKENIZERS
from unipred.nn.loss import next_embedding_loss, pair_loss
from unipred.nn.model import NEPA, model_config
from unipred.nn.objectives import (
    ObjectiveConfig,
    normalise_targets,
    order_keys,
    permutation,
    permute,
)
from unipred.train.callbacks import CollapseMonitor
from unipred.train.config import ConfigError, build_model_config, load_config

SR = 16000
MODALITIES = {
    "image": {"tokenizer_args": {"patch_size": 4, "in_chans": 3}},
    "video": {"tokenizer": "video", "tokenizer_args": {"patch_size": 4, "tubelet_size": 2}},
    "audio": {"tokenizer": "audio", "tokenizer_args": {"n_mels": 32, "patch_size": 8}},
    "audio_frames": {"tokenizer": "audio_frames", "tokenizer_args": {"frame_ms": 50.0}},
}


def _model(modality="image", seed=0, cls_head=None, registers=0, causal=True, **objective):
    kw = dict(MODALITIES[modality])
    cfg = model_config("nepa_debug", causal=causal, head=cls_head, registers=registers, **kw)
    cfg.objective = ObjectiveConfig(**objective)
    if cls_head:
        cfg.num_classes = 3
    torch.manual_seed(seed)
    return NEPA(cfg)


def _input(modality, B=3):
    torch.manual_seed(1)
    if modality == "image":
        return torch.randn(B, 3, 16, 16)
    if modality == "video":
        return torch.randn(B, 3, 4, 8, 8)
    lengths = torch.tensor([SR // 2] + [SR // 4] * (B - 1))  # padded clips: valid masks
    return {"wave": 0.1 * torch.randn(B, SR // 2), "lengths": lengths}


def _reference_loss(m, x):
    """The release's objective computed from the model's parts, as before the switches."""
    seq, coords, valid = m.embed(x)
    hidden = m.predictor(seq, coords, valid)
    return next_embedding_loss(hidden, seq, valid)


# ------------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_default_objective_is_the_release_loss_exactly(modality):
    m, x = _model(modality), _input(modality)
    assert not any(k.startswith("objective.") for k in m.state_dict())  # no new parameters
    torch.manual_seed(5)
    got = m(x).loss
    torch.manual_seed(5)  # the same RoPE augmentation draw
    assert torch.equal(got, _reference_loss(m, x))


def test_horizon_one_equals_default_and_k_averages_the_heads():
    x = _input("image")
    m1, m2 = _model(), _model(horizon=2)
    # the trunk is identical (same seed, the extra head is built after it)
    sd = {k: v for k, v in m2.state_dict().items() if not k.startswith("objective.")}
    assert sd.keys() == m1.state_dict().keys()
    m1.load_state_dict(sd)
    m1.eval(), m2.eval()
    k1 = m1(x).loss
    assert torch.equal(_model(horizon=1).eval()(x).loss, _model().eval()(x).loss)
    out = m2(x)
    hidden, target = out.predictions, out.targets.detach()
    step2 = -F.cosine_similarity(m2.objective.heads[1](hidden[:, :-2]), target[:, 2:], dim=-1)
    torch.testing.assert_close(out.loss, (k1 + step2.mean()) / 2, rtol=0, atol=1e-6)
    assert isinstance(m2.objective.heads[1], torch.nn.Linear)


def test_transformer_head_shapes_gradients_and_the_loss_it_computes():
    x = _input("image")
    m = _model(head="transformer", head_depth=2, horizon=2).eval()
    obj = m.objective
    assert len(obj.trunk_head.blocks) == 2 and obj.trunk_head.cfg.dim == m.predictor.cfg.dim
    assert isinstance(obj.heads[0], torch.nn.Identity) and isinstance(obj.heads[1], torch.nn.Linear)
    with pytest.raises(ValueError, match="head_depth must be >= 1"):
        ObjectiveConfig(head="transformer", head_depth=0)
    out = m(x)
    seq, coords, valid = m.embed(x)
    assert out.predictions.shape == seq.shape  # the trunk's output, as without the head
    assert torch.equal(out.predictions, m.predictor(seq, coords, valid))
    h = obj.trunk_head(out.predictions, coords, valid)  # the head reads the trunk's output
    t = out.targets.detach()
    ref = (-F.cosine_similarity(h[:, :-1], t[:, 1:], dim=-1).mean()
           - F.cosine_similarity(obj.heads[1](h[:, :-2]), t[:, 2:], dim=-1).mean()) / 2  # fmt: skip
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-6)
    m.train()
    m(x).loss.backward()
    for part in (obj.trunk_head, m.predictor, m.tokenizer):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_transformer_head_keeps_the_objective_causal():
    """Output t of the head must not see token t + 1 (its target): changing the last trunk
    output leaves every earlier head output alone; a bidirectional head (the broken variant)
    leaks."""
    m = _model(head="transformer").eval()
    head = m.objective.trunk_head
    with torch.no_grad():  # a trained head's residual branches, not LayerScale's 1e-5 start
        for name, p in head.named_parameters():
            if ".ls" in name:
                p.fill_(1.0)
    _, coords, valid = m.embed(_input("image"))
    torch.manual_seed(2)
    hidden = torch.randn(3, 1 + coords.shape[0], m.predictor.cfg.dim)
    moved = hidden.clone()
    moved[:, -1] = torch.randn(3, hidden.shape[-1])
    for broken in (False, True):
        causal = False if broken else None  # None: the trunk's own (causal) attention
        a, b = (m.objective.transform(h, coords, valid, causal) for h in (hidden, moved))
        assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5) != broken
        assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-5)


# ----------------------------------------------------------------------------- token order
def test_identity_permutation_equals_default():
    m, x = _model().eval(), _input("image")
    tokens, coords, valid = m.tokenizer(x)
    ident = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    t2, c2, v2, _ = permute(ident, tokens, coords, valid)
    assert c2.shape == (3, tokens.shape[1], 2)  # coordinates became per sample
    seq, _ = m.with_prefix(t2)
    hidden = m.predictor(seq, c2)
    assert torch.equal(next_embedding_loss(hidden, seq), m(x).loss)


@pytest.mark.parametrize("order", ["reverse", "random_fixed", "random"])
def test_coordinates_travel_with_the_tokens(order):
    """Bidirectional attention with RoPE is permutation-equivariant when coordinates move with
    their tokens: the permuted run's outputs are the original outputs, permuted."""
    m, x = _model(causal=False, order=order).eval(), _input("image")
    tokens, coords, valid = m.tokenizer(x)
    t2, c2, _, _ = m.objective.order(tokens, coords, valid, None)
    assert not torch.equal(t2, tokens)
    base = m.predictor(m.with_prefix(tokens)[0], coords)[:, 1:]
    moved = m.predictor(m.with_prefix(t2)[0], c2)[:, 1:]
    # where each moved token came from, read from the values themselves
    idx = (tokens[..., :1] == t2[..., :1].transpose(1, 2)).float().argmax(1)  # (B, N)
    torch.testing.assert_close(moved, base.gather(1, idx[..., None].expand_as(base)))


def test_order_kinds():
    n = 6
    assert order_keys("tokenizer", n, 2, 0, "cpu") is None
    rev = permutation(order_keys("reverse", n, 2, 0, "cpu"), None, 2)
    assert rev.tolist() == [[5, 4, 3, 2, 1, 0]] * 2
    fixed = [permutation(order_keys("random_fixed", n, 2, 7, "cpu"), None, 2) for _ in range(2)]
    assert torch.equal(fixed[0], fixed[1]) and sorted(fixed[0][0].tolist()) == list(range(n))
    torch.manual_seed(0)
    per = permutation(order_keys("random", 50, 2, 0, "cpu"), None, 2)
    assert per.shape == (2, 50) and not torch.equal(per[0], per[1])
    # padded tokens go last; the real ones take the chosen order among themselves
    valid = torch.tensor([[True, True, True, True, False, False]])
    p = permutation(order_keys("reverse", n, 1, 0, "cpu"), valid, 1)
    assert p.tolist() == [[3, 2, 1, 0, 5, 4]]


# ------------------------------------------------------------------------- prefix tokens
def test_registers_never_reach_the_loss_nor_the_pool():
    m = _model(registers=3).eval()
    assert m.n_prefix == 4 and m.register_tokens.shape == (1, 3, 64)
    x = _input("image")
    out = m(x)
    hidden = out.predictions.detach().requires_grad_(True)
    target = out.targets.detach().clone()
    loss = m.objective.loss(hidden, target, None, m.n_prefix)
    (g,) = torch.autograd.grad(loss, hidden)
    # only the last prefix position (it predicts the first token) and the tokens feed the loss
    assert g[:, :3].abs().sum() == 0 and g[:, 3:-1].abs().sum() > 0
    target[:, :4] = torch.randn_like(target[:, :4])  # prefix rows are never targets
    assert torch.equal(m.objective.loss(hidden, target, None, m.n_prefix), loss)
    c = _model(registers=3, cls_head="mean", causal=False).eval()
    o = c(x)
    feats = c.head.fc_norm(o.hidden[:, 4:].mean(1))
    torch.testing.assert_close(o.features, feats)  # registers are not pooled


# ----------------------------------------------------------------------- shift, stop-grad
def test_no_shift_pairs_each_output_with_its_own_input():
    h = torch.randn(2, 7, 16)
    for shift, expect in ((False, -1.0), (True, None)):
        obj = _model(shift=shift).objective
        loss = obj.loss(h, h.clone(), None, 1)
        if expect is None:
            assert loss > -0.9
        else:
            assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert ObjectiveConfig(shift=False, horizon=2).offsets == [0, 1]


def test_stop_gradient_switch_controls_the_target_gradient():
    x = _input("image")
    grads = {}
    for stop in (True, False):
        m = _model(stop_grad=stop).eval()
        w = m.tokenizer.proj.weight
        (grads[stop],) = torch.autograd.grad(m(x).loss, w)
        seq, coords, _ = m.embed(x)  # the same loss written out, target kept or detached
        hidden = m.predictor(seq, coords)
        target = seq[:, 1:].detach() if stop else seq[:, 1:]
        ref = -F.cosine_similarity(hidden[:, :-1], target, dim=-1).mean()
        (g_ref,) = torch.autograd.grad(ref, w)
        torch.testing.assert_close(grads[stop], g_ref)
    assert not torch.allclose(grads[True], grads[False])  # the target side now learns too


# ----------------------------------------------------------------------------- masking
def test_input_masking_replaces_inputs_not_targets():
    m, x = _model(mask_ratio=0.5).eval(), _input("image")
    tokens = m.tokenizer(x).tokens
    masked = m.objective.mask_inputs(tokens)
    hit = (masked == m.objective.mask_token).all(-1)
    assert (hit.sum(1) == 8).all()  # round(0.5 * 16) per sample
    assert torch.equal(masked[~hit], tokens[~hit])
    out = m(x)
    assert torch.equal(out.targets, m.embed(x)[0])  # targets: the unmasked embeddings
    assert "objective.mask_token" in m.state_dict()


# ------------------------------------------------------------------------------- losses
def test_loss_kinds():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 8)
    for kind in ("cosine", "mse", "smooth_l1", "infonce"):
        perfect = pair_loss(t * (1 if kind in ("mse", "smooth_l1") else 3), t, None, kind)
        wrong = pair_loss(torch.randn(2, 5, 8), t, None, kind)
        assert perfect < wrong, kind
    assert pair_loss(t, t, None, "mse") == 0 and pair_loss(t, t, None, "smooth_l1") == 0
    # infonce: the positive among the sample's 5 targets, temperature 0.1
    p = F.normalize(t, dim=-1)
    logits = p @ p.transpose(1, 2) / 0.1
    ref = F.cross_entropy(logits.reshape(-1, 5), torch.arange(5).repeat(2))
    torch.testing.assert_close(pair_loss(t, t, None, "infonce"), ref)
    # padded pairs: no NaN, and padded targets are no candidates
    pair = torch.tensor([[True] * 5, [True, True, True, False, False]])
    lp = pair_loss(t, t, pair, "infonce")
    assert torch.isfinite(lp)
    with pytest.raises(ValueError, match="unknown loss 'l3'"):
        pair_loss(t, t, None, "l3")


def test_infonce_position_contrasts_the_samples_at_each_position():
    torch.manual_seed(0)
    p, t = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    pn, tn = F.normalize(p, dim=-1), F.normalize(t, dim=-1)
    # position l: sample b's prediction picks its own target among the 3 samples' targets at l
    ref = torch.stack([F.cross_entropy(pn[:, j] @ tn[:, j].T / 0.1, torch.arange(3),
                                       reduction="none") for j in range(4)], 1)  # fmt: skip
    torch.testing.assert_close(pair_loss(p, t, None, "infonce_position"), ref.mean())
    # another position's target is no negative: changing it leaves position 0's terms alone
    t2 = t.clone()
    t2[:, 1:] = torch.randn(3, 3, 8)
    a = pair_loss(p[:, :1], t[:, :1], None, "infonce_position")
    b = pair_loss(p[:, :1], t2[:, :1], None, "infonce_position")
    torch.testing.assert_close(a, b)
    # padding: a padded target is no candidate, a padded pair adds no term and no NaN
    pair = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4])
    got = pair_loss(p, t, pair, "infonce_position")
    terms = []
    for j in range(4):
        keep = pair[:, j]
        lg = pn[keep, j] @ tn[keep, j].T / 0.1
        terms.append(F.cross_entropy(lg, torch.arange(int(keep.sum())), reduction="none"))
    torch.testing.assert_close(got, torch.cat(terms).mean())


@pytest.mark.parametrize(
    "kind", ["mse", "smooth_l1", "infonce", "infonce_batch", "infonce_position"]
)
def test_loss_switch_changes_only_the_comparison(kind):
    x = _input("image")
    m0, m1 = _model().eval(), _model(loss=kind).eval()
    o0, o1 = m0(x), m1(x)
    assert torch.equal(o0.predictions, o1.predictions) and torch.equal(o0.targets, o1.targets)
    ref = pair_loss(o0.predictions[:, :-1], o0.targets[:, 1:], None, kind)
    assert torch.equal(o1.loss, ref) and not torch.equal(o1.loss, o0.loss)


# ------------------------------------------------------------------------------ targets
def test_layer_target_is_that_blocks_output():
    m, x = _model(target="layer", target_layer=0).eval(), _input("image")
    out = m(x)
    feats = m.forward_features(x, layers=(0,))
    assert torch.equal(out.targets, feats.layers[0])
    assert torch.equal(out.predictions, feats.hidden)
    with pytest.raises(ValueError, match="target_layer 5"):
        _model(target="layer", target_layer=5)(x)


def test_ema_target_is_the_teachers_top_blocks_and_the_teacher_follows_the_student():
    m, x = _model(target="ema", ema_momentum=0.5), _input("image")
    seq, coords, valid = m.embed(x)
    m.eval()  # no EMA step outside training
    t = m(x).targets
    top = len(m.predictor.blocks) - 1
    want = m.predictor.forward_features(seq, coords, valid, False, (top,)).layers[0]
    torch.testing.assert_close(t, want)  # the teacher starts as the student, bidirectional
    assert not any(p.requires_grad for p in m.objective.teacher.parameters())
    m.train()
    w0 = m.objective.teacher.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        m.predictor.blocks[0].attn.qkv.weight.add_(1.0)
    m(x).loss.backward()  # one training forward = one EMA step with momentum 0.5
    torch.testing.assert_close(m.objective.teacher.blocks[0].attn.qkv.weight, w0 + 0.5)
    assert m.objective.teacher.blocks[0].attn.qkv.weight.grad is None
    # two layers: the instance-normalised outputs of the top two blocks, averaged
    m2 = _model(target="ema", ema_layers=2).eval()
    seq, coords, valid = m2.embed(x)
    hs = m2.predictor.forward_features(seq, coords, valid, False, (top - 1, top)).layers
    avg = (normalise_targets(hs[0], None, 1, "instance") + normalise_targets(hs[1], None, 1,
           "instance")) / 2  # fmt: skip
    torch.testing.assert_close(m2(x).targets, avg)
    with pytest.raises(ValueError, match="ema_layers must be >= 1"):
        ObjectiveConfig(target="ema", ema_layers=0)


def _conv_of_patches(tk, patches):
    """What the tokenizer's patch embedding computes from its raw patches, if the patches are
    in token order and laid out as the kernel expects."""
    w = tk.proj.weight  # (D, C, *kernel)
    dims = list(range(2, w.dim())) + [1]  # kernel (time/freq/y/x) first, channels last
    return patches @ w.permute(0, *dims).reshape(w.shape[0], -1).T + tk.proj.bias


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_patches_are_the_tokenizers_raw_input_in_token_order(modality):
    kw = MODALITIES[modality]
    tk = TOKENIZERS.get(kw.get("tokenizer", "image"))(dim=16, **kw["tokenizer_args"])
    x = _input(modality, B=2)
    p, tokens = tk.patches(x), tk(x).tokens
    assert p.shape == (*tokens.shape[:2], tk.patch_dim)
    if modality == "audio_frames":  # Conv1d kernel (D, 1, frame)
        ref = p @ tk.proj.weight[:, 0].T + tk.proj.bias
    else:
        ref = _conv_of_patches(tk, p)
    torch.testing.assert_close(ref, tokens, rtol=1e-4, atol=1e-4)


def test_pixel_target_is_normalised_patches_never_the_prefix():
    m, x = _model(target="patch").eval(), _input("image")
    out = m(x)
    assert out.targets.shape == (3, 17, 48) and torch.equal(out.targets[:, 0], torch.zeros(3, 48))
    pix = m.tokenizer.patches(x)
    norm = (pix - pix.mean(-1, keepdim=True)) / (
        pix.var(-1, unbiased=False, keepdim=True) + 1e-6
    ).sqrt()
    torch.testing.assert_close(out.targets[:, 1:], norm)
    assert m.objective.heads[0].out_features == 48


def test_target_norm_centres_and_scales_each_feature_over_the_real_tokens():
    torch.manual_seed(0)
    t = torch.randn(2, 6, 5) * 3 + 7
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert normalise_targets(t, valid, 1, "none") is t
    for kind in ("center", "instance"):
        got = normalise_targets(t, valid, 1, kind)
        assert torch.equal(got[:, 0], t[:, 0])  # the prefix row is never a target: untouched
        for b, n in ((0, 6), (1, 4)):  # sample 1: its two padded tokens enter no statistic
            ref = t[b, 1:n] - t[b, 1:n].mean(0)
            if kind == "instance":
                ref = ref / (ref.var(0, unbiased=False) + 1e-6).sqrt()
            torch.testing.assert_close(got[b, 1:n], ref)
        # a component shared by every token (a bias) is removed: the point of the switch
        real = valid.clone()
        real[:, 0] = False
        torch.testing.assert_close(
            normalise_targets(t + torch.randn(5), valid, 1, kind)[real], got[real]
        )


@pytest.mark.parametrize("kind", ["center", "instance"])
def test_target_norm_loss_compares_with_the_normalised_embeddings(kind):
    m, x = _model(target_norm=kind).eval(), _input("image")
    assert not any(k.startswith("objective.") for k in m.state_dict())  # no new parameters
    out = m(x)
    t = normalise_targets(out.targets.detach(), None, 1, kind)
    ref = -F.cosine_similarity(out.predictions[:, :-1], t[:, 1:], dim=-1).mean()
    torch.testing.assert_close(out.loss, ref)
    assert not torch.allclose(out.loss, _model().eval()(x).loss)


# ---------------------------------------------------------------- every switch, every modality
SWITCHES = [
    {"shift": False}, {"stop_grad": False}, {"mask_ratio": 0.3}, {"loss": "mse"},
    {"loss": "smooth_l1"}, {"loss": "infonce"}, {"target": "layer", "target_layer": -1},
    {"target": "patch"}, {"horizon": 3}, {"order": "reverse"}, {"order": "random_fixed"},
    {"order": "random"}, {"head": "mlp"}, {"registers": 2}, {"target_norm": "center"},
    {"target_norm": "instance"}, {"target": "ema"}, {"target": "ema", "ema_layers": 2},
    {"head": "transformer"}, {"head": "transformer", "head_depth": 2, "horizon": 2},
]  # fmt: skip


@pytest.mark.parametrize("modality", ["image", "video", "audio", "audio_frames"])
def test_every_switch_trains_on_every_modality(modality):
    x = _input(modality)
    for sw in SWITCHES:
        sw = dict(sw)
        m = _model(modality, registers=sw.pop("registers", 0), **sw)
        loss = m(x).loss
        loss.backward()
        assert torch.isfinite(loss), (modality, sw)
        assert m.tokenizer.proj.weight.grad.abs().sum() > 0, (modality, sw)


def test_causal_switch_is_the_predictor_flag():
    x = _input("image")
    a, b = _model(causal=True).eval(), _model(causal=False).eval()
    assert not torch.equal(a(x).loss, b(x).loss)


# ------------------------------------------------------------------------------- config
def test_config_keys_and_errors(tmp_path):
    cfg = load_config(
        "configs/debug/image_nepa_tiny.yaml",
        ["model.objective.loss=infonce", "model.objective.horizon=2", "model.registers=2",
         f"run_dir={tmp_path}"],
    )  # fmt: skip
    mc = build_model_config(cfg.model)
    assert mc.registers == 2 and mc.objective.loss == "infonce" and mc.objective.horizon == 2
    assert dataclasses.replace(mc.objective, loss="cosine", horizon=1) == ObjectiveConfig()
    with pytest.raises(ConfigError, match=r"model.objective.loss: 'l3' is not one of"):
        load_config("configs/debug/image_nepa_tiny.yaml", ["model.objective.loss=l3"])
    with pytest.raises(ConfigError, match=r"model.objective.horizon must be >= 1"):
        load_config("configs/debug/image_nepa_tiny.yaml", ["model.objective.horizon=0"])
    with pytest.raises(ConfigError, match=r"model.objective.ordr"):
        load_config("configs/debug/image_nepa_tiny.yaml", ["model.objective.ordr=reverse"])


def test_pretrained_objective_parameters_are_dropped_for_finetuning(tmp_path):
    from unipred.train.checkpoint import load_backbone

    src = _model(mask_ratio=0.2, horizon=2, registers=2, head="transformer")
    assert any(k.startswith("objective.trunk_head.") for k in src.state_dict())
    dst = _model(registers=2, cls_head="mean", causal=False, seed=3)
    load_backbone(dst, src.state_dict(), "test")
    assert torch.equal(dst.register_tokens, src.register_tokens)


# ---------------------------------------------------------------------- collapse monitor
class _Trainer:  # the parts of a Lightning Trainer the monitor reads
    global_step = 0
    should_stop = False
    is_global_zero = True
    loggers: list = []


class _Lit:
    class task:
        want_stats = False


def test_stop_on_collapse_ends_the_run_naming_the_step():
    healthy = {"erank": 20.0, "std_mean": 0.3, "target_erank": 15.0, "target_std_mean": 0.3}
    collapsed = dict(healthy, target_erank=1.1)
    for stop in (False, True):
        mon, tr = CollapseMonitor(10, dim=64, stop=stop), _Trainer()
        for step, stats in ((0, healthy), (10, healthy), (20, collapsed)):
            tr.global_step = step
            mon.on_train_batch_start(tr, _Lit, None, 0)
            logs = {"logs": {f"collapse/{k}": torch.tensor(v) for k, v in stats.items()}}
            tr.global_step = step + 1
            if stats is collapsed:
                with pytest.warns(UserWarning, match=r"step 20: .*targets: effective rank 1.10"):
                    mon.on_train_batch_end(tr, _Lit, logs, None, 0)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    mon.on_train_batch_end(tr, _Lit, logs, None, 0)
        assert mon.first_step == 20 and len(mon.history) == 3
        assert tr.should_stop == stop and mon.stopped_step == (20 if stop else None)


def test_spread_sees_rows_shrinking_to_one_vector_that_the_rank_misses():
    from unipred.task import collapse_stats

    torch.manual_seed(0)
    healthy = collapse_stats(torch.randn(4, 32, 64))
    # what the no-stop-gradient run does: every row near one vector, isotropic residue
    shrunk = collapse_stats(torch.randn(64) * 5 + 0.01 * torch.randn(4, 32, 64))
    assert healthy["spread"] > 0.9 and shrunk["spread"] < 0.01
    assert shrunk["erank"] > 20  # the effective rank alone would call this healthy
    mon = CollapseMonitor(1, dim=64)
    with pytest.warns(UserWarning, match="spread 0.00"):
        mon.on_train_batch_end(
            _Trainer(), _Lit, {"logs": {f"collapse/{k}": v for k, v in shrunk.items()}}, None, 0
        )


def test_ablation_settings_are_valid_configs_and_the_table_prints():
    """Every setting of benchmarks/ablations.py loads as a config and builds its model."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"
    spec = importlib.util.spec_from_file_location("ablations", path)
    abl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(abl)
    for name, (_, arch, pre) in abl.SETTINGS.items():
        cfg = load_config("configs/demo/fmnist_pretrain.yaml", [*arch, *pre], check_paths=False)
        NEPA(build_model_config(cfg.model, head=None))  # builds: the keys are real switches
        assert arch or pre or name == "default"
    row = {"name": "no_shift", "loss": -0.99, "erank_pred": 10.0, "erank_target": 5.0,
           "spread_pred": 0.8, "spread_target": 0.7, "min_spread": 0.6, "warned_at": 30,
           "warnings": 2, "probe": 0.36, "finetune": 0.19}  # fmt: skip
    text = abl.table([row, {"name": "random_init", "probe": 0.5, "finetune": 0.3}])
    assert "| no shift (`no_shift`) | -0.9900 |" in text and "30 (2x)" in text
    assert "| random init, no pretraining (`random_init`) | - |" in text


def test_collapse_monitor_checks_and_names_each_source():
    """Joint pretraining logs one group per source (collapse/NAME/...): each is checked and
    named on its own."""
    healthy = {"erank": 20.0, "std_mean": 0.3, "spread": 0.8}
    collapsed = {"erank": 20.0, "std_mean": 0.3, "spread": 0.01}
    mon, tr = CollapseMonitor(1, dim=64, stop=True), _Trainer()
    logs = {f"collapse/image/{k}": torch.tensor(v) for k, v in healthy.items()}
    logs.update({f"collapse/audio/{k}": torch.tensor(v) for k, v in collapsed.items()})
    with pytest.warns(UserWarning, match=r"step 0: .*\(audio predictions: .*spread 0.010") as w:
        mon.on_train_batch_end(tr, _Lit, {"logs": logs}, None, 0)
    assert "image" not in str(w[0].message) and tr.should_stop
    assert mon.history[0]["image/spread"] == pytest.approx(0.8)


def test_infonce_batch_uses_the_other_samples_as_negatives():
    torch.manual_seed(0)
    t = torch.randn(3, 4, 8)
    p = F.normalize(t, dim=-1).reshape(12, 8)
    ref = F.cross_entropy(p @ p.T / 0.1, torch.arange(12))
    torch.testing.assert_close(pair_loss(t, t, None, "infonce_batch"), ref)
    # more candidates than the per-sample InfoNCE: a harder task, never an easier one
    assert pair_loss(t, t, None, "infonce_batch") > pair_loss(t, t, None, "infonce")
    # padded pairs are no candidates and add no NaN: equal to the loss on the real tokens only
    pair = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4])
    real = t[pair]
    q = F.normalize(real, dim=-1)
    ref = F.cross_entropy(q @ q.T / 0.1, torch.arange(real.shape[0]))
    torch.testing.assert_close(pair_loss(t, t, pair, "infonce_batch"), ref)


def _nce_reference(p, t, pair, kind, temperature=0.1):
    """InfoNCE through plain autograd (cross-entropy over each group's real targets): what the
    written-out forward and backward of unipred.nn.loss must equal."""
    B, L, _ = p.shape
    pn, tn = F.normalize(p, dim=-1), F.normalize(t, dim=-1)
    if pair is None:
        pair = torch.ones(B, L, dtype=torch.bool)
    if kind == "infonce":
        groups = [(pn[b], tn[b], pair[b]) for b in range(B)]
    elif kind == "infonce_batch":
        groups = [(pn.reshape(B * L, -1), tn.reshape(B * L, -1), pair.reshape(-1))]
    else:
        groups = [(pn[:, j], tn[:, j], pair[:, j]) for j in range(L)]
    terms = [F.cross_entropy(a[k] @ b[k].T / temperature, torch.arange(int(k.sum())),
                             reduction="none") for a, b, k in groups if k.any()]  # fmt: skip
    return torch.cat(terms).mean()


@pytest.mark.parametrize("kind", ["infonce", "infonce_batch", "infonce_position"])
@pytest.mark.parametrize("padded", [False, True])
def test_infonce_forward_and_backward_equal_plain_autograd(kind, padded):
    torch.manual_seed(1)
    p = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    pair = torch.rand(3, 5) > 0.35 if padded else None
    if padded:
        pair[0, 0] = True
    want = _nce_reference(p, t, pair, kind)
    gw = torch.autograd.grad(want, (p, t))
    got = pair_loss(p, t, pair, kind)
    gg = torch.autograd.grad(got, (p, t))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(gg, gw):  # both sides: the target side learns when stop_grad is off
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a detached target gets no gradient and the prediction's is unchanged
    gp = torch.autograd.grad(pair_loss(p, t.detach(), pair, kind), p)[0]
    torch.testing.assert_close(gp, gg[0])


@pytest.mark.parametrize("kind", ["infonce", "infonce_batch", "infonce_position"])
def test_infonce_without_a_real_pair_is_zero_not_nan(kind):
    p = torch.randn(3, 4, 8, requires_grad=True)
    pair = torch.zeros(3, 4, dtype=torch.bool)
    loss = pair_loss(p, torch.randn(3, 4, 8), pair, kind)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(p.grad).all() and not p.grad.any()
    # one sample without a real pair: the others' loss, finite gradients everywhere
    pair[1:] = True
    p.grad = None
    pair_loss(p, torch.randn(3, 4, 8), pair, kind).backward()
    assert torch.isfinite(p.grad).all() and p.grad[1].abs().sum() > 0 and not p.grad[0].any()


RANKS_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.nn.functional as F
from unipred.nn.loss import pair_loss

def work(rank, init, q):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)  # every rank builds the same global batch and keeps its own rows
    p = torch.randn(4, 5, 8, dtype=torch.float64)
    t = torch.randn(4, 5, 8, dtype=torch.float64)
    pair = torch.rand(4, 5) > 0.3
    mine = slice(0, 2) if rank == 0 else slice(2, 4)
    out = {}
    for name, pr in (("full", None), ("padded", pair)):
        x = p[mine].clone().requires_grad_()
        keep = None if pr is None else pr[mine]
        loss = pair_loss(x, t[mine], keep, "infonce_batch")
        loss.backward()
        out[name] = (float(loss.detach()), x.grad.tolist())  # plain lists: a queue shares no tensor
        # one process, the whole batch: each of this rank's real rows against every real target
        xr = p.clone().requires_grad_()
        k = torch.ones(4, 5, dtype=torch.bool) if pr is None else pr
        pn, tn = F.normalize(xr, dim=-1).reshape(20, 8), F.normalize(t, dim=-1).reshape(20, 8)
        logits = (pn @ tn[k.reshape(-1)].T / 0.1)
        pos = (pn * tn).sum(-1) / 0.1
        per = logits.logsumexp(-1) - pos
        rows = torch.zeros(4, 5, dtype=torch.bool)
        rows[mine] = k[mine]
        ref = per[rows.reshape(-1)].mean()
        ref.backward()
        out[name] += (float(ref), xr.grad[mine].tolist())
    with torch.no_grad():  # no gradient (evaluation): each rank's own batch, nothing gathered
        out["eval"] = float(pair_loss(p[mine], t[mine], None, "infonce_batch"))
        out["eval_ref"] = float(pair_loss(p[mine], t[mine], None, "infonce_batch"))
    q.put((rank, out))
    dist.destroy_process_group()

if __name__ == "__main__":
    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(work, args=(sys.argv[1], q), nprocs=2)
    got = dict(q.get() for _ in range(2))
    torch.save(got, sys.argv[2])
"""


def test_infonce_batch_takes_the_other_ranks_targets_as_negatives(tmp_path):
    """Two gloo processes, each with half of a batch: each rank's loss and prediction gradients
    are those of one process holding the whole batch (every target of both ranks a candidate),
    padded pairs included; under no_grad nothing is gathered."""
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    out = tmp_path / "got.pt"
    subprocess.run([sys.executable, str(script), f"file://{tmp_path / 'pg'}", str(out)],
                   check=True, timeout=300)  # fmt: skip
    got = torch.load(out)
    for rank in (0, 1):
        for name in ("full", "padded"):
            loss, grad, ref, ref_grad = got[rank][name]
            # (pair_loss computes in float32)
            assert loss == pytest.approx(ref, rel=1e-6), (rank, name)
            torch.testing.assert_close(torch.tensor(grad), torch.tensor(ref_grad), rtol=1e-4,
                                       atol=1e-6)  # fmt: skip
        # the local-batch loss (a smaller candidate set) differs from the gathered one
        assert got[rank]["eval"] < got[rank]["full"][0]
