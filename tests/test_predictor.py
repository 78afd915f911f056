"""Behavioural tests of the predictor core: causality, RoPE, SDPA vs eager, padding."""

import pytest
import torch

from unipred.nn.predictor import Predictor, PredictorConfig
from unipred.nn.rope import AxialRoPE, apply_rope, grid_coords


def _pred(**kw):
    torch.manual_seed(0)
    cfg = PredictorConfig(dim=32, depth=2, heads=4, qk_norm_affine=True, layerscale=0.5, **kw)
    return Predictor(cfg).eval()


def _inputs(B=2, n=4):
    torch.manual_seed(1)
    coords = grid_coords(n, n)
    return torch.randn(B, n * n + 1, 32), coords


@torch.no_grad()
def test_causal_outputs_before_j_ignore_token_j():
    p = _pred()
    x, c = _inputs()
    j = 9
    y = x.clone()
    y[:, j] += torch.randn_like(y[:, j])
    a, b = p(x, c), p(y, c)
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6)
    assert not torch.allclose(a[:, j:], b[:, j:], atol=1e-3)


@torch.no_grad()
def test_bidirectional_outputs_see_every_token():
    p = _pred(causal=False)
    x, c = _inputs()
    y = x.clone()
    y[:, -1] += torch.randn(32)
    assert not torch.allclose(p(x, c)[:, 0], p(y, c)[:, 0], atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@torch.no_grad()
def test_sdpa_equals_eager(causal, mlp):
    p = _pred(causal=causal, mlp=mlp)
    x, c = _inputs()
    fast = p.forward_features(x, c).hidden
    slow = p.forward_features(x, c, return_attn=True)
    assert (fast - slow.hidden).abs().max() < 1e-6
    att = slow.attentions[0]
    assert torch.allclose(att.sum(-1), torch.ones(()), atol=1e-5)
    if causal:
        assert att.triu(1).abs().max() == 0


def test_rope_depends_only_on_relative_offsets():
    rope = AxialRoPE(head_dim=16, coord_dims=2, theta=100.0, rescale=None).eval()
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)

    def score(pq, pk):
        cos, sin = rope.tables(torch.tensor([pq, pk]))
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return (qr[0, 0, 0] * kr[0, 0, 1]).sum()

    s1 = score([0.1, -0.3], [0.4, 0.2])
    s2 = score([0.1 + 0.37, -0.3 - 0.21], [0.4 + 0.37, 0.2 - 0.21])  # same offset, shifted
    s3 = score([0.1, -0.3], [0.5, 0.2])  # different offset
    assert torch.allclose(s1, s2, atol=1e-5)
    assert not torch.allclose(s1, s3, atol=1e-3)


def test_rope_prefix_tokens_are_not_rotated():
    p = _pred()
    x, c = _inputs()
    # moving every patch coordinate changes patch outputs but not the cls output under causal attention
    with torch.no_grad():
        a, b = p(x, c), p(x, c * 0.5)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)
    assert not torch.allclose(a[:, 1:], b[:, 1:], atol=1e-4)


def test_rope_augmentation_only_in_training():
    rope = AxialRoPE(16, 2, rescale=2.0)
    c = grid_coords(4, 4)
    rope.eval()
    assert torch.equal(rope.tables(c)[0], rope.tables(c)[0])
    rope.train()
    torch.manual_seed(0)
    assert not torch.equal(rope.tables(c)[0], rope.tables(c)[0])


def test_3d_rope_with_passthrough_channels():
    rope = AxialRoPE(head_dim=16, coord_dims=3)  # 16 // 6 = 2 freqs per axis, 12 rotated, 4 pass
    assert rope.rot_dim == 12
    cos, sin = rope.eval().tables(grid_coords(2, 2, 2))
    x = torch.randn(1, 2, 8, 16)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 12:], x[..., 12:])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


@torch.no_grad()
def test_padding_cannot_change_real_outputs():
    for causal in (True, False):
        p = _pred(causal=causal)
        x, c = _inputs(B=1)
        valid = torch.ones(1, 17, dtype=torch.bool)
        valid[:, 12:] = False
        y = x.clone()
        y[:, 12:] = torch.randn(1, 5, 32) * 10  # garbage in the padded slots
        a = p(x, c, valid)[:, :12]
        b = p(y, c, valid)[:, :12]
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.isfinite(p(y, c, valid)).all()


def test_drop_path_is_per_sample_and_off_in_eval():
    p = _pred(drop_path=0.5)
    assert p.blocks[0].drop_path1.p == 0.0 and p.blocks[-1].drop_path1.p == 0.5
    x, c = _inputs()
    with torch.no_grad():
        assert torch.equal(p.eval()(x, c), p(x, c))


def test_bad_shapes_raise_clear_errors():
    p = _pred()
    with pytest.raises(ValueError, match="width 32"):
        p(torch.randn(1, 5, 16), grid_coords(2, 2))
    with pytest.raises(ValueError, match="coords"):
        p(torch.randn(1, 3, 32), grid_coords(2, 2))
    with pytest.raises(ValueError, match="divisible"):
        PredictorConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="mlp"):
        PredictorConfig(mlp="relu6")


def test_gradient_checkpointing_same_gradients():
    p = _pred().train()
    p.rope.rescale = None
    x, c = _inputs()
    p(x, c).sum().backward()
    g1 = [q.grad.clone() for q in p.parameters()]
    p.zero_grad()
    p.grad_checkpointing = True
    p(x, c).sum().backward()
    for a, q in zip(g1, p.parameters()):
        assert torch.allclose(a, q.grad, atol=1e-6)


def _same_as_math_kernel(P, x, c, valid):
    """bf16 outputs and gradients of ``_cpu_attention`` against SDPA's math kernel."""

    def run(kind, causal, mask):
        P.CPU_ATTENTION = kind
        try:
            p = _pred(causal=causal).train()
            p.rope.rescale = None  # no random RoPE augmentation: both runs see the same input
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = p(x, c, mask)
            out.float().sum().backward()
            return out.float(), [q.grad.float() for q in p.parameters()]
        finally:
            P.CPU_ATTENTION = "explicit"

    for causal in (True, False):
        for mask in (None, valid):
            ref, ref_g = run("math", causal, mask)
            out, g = run("explicit", causal, mask)
            assert (out - ref).abs().max() < 0.05, (x.shape, causal, mask is None)  # rounding
            for a, b in zip(g, ref_g):
                assert (a - b).norm() <= 0.02 * b.norm() + 1e-3, (x.shape, causal, mask is None)


def test_cpu_bf16_attention_avoids_flash_and_matches_the_math_kernel():
    """CPU flash-attention backward in bf16 is slow; the predictor routes around it with its
    own fp32 attention (``_cpu_attention``: explicit ops for 17 tokens, SDPA on fp32 copies for
    37), which must give what SDPA's math kernel gives (outputs and gradients), causal,
    bidirectional and with a padding mask."""
    from torch.profiler import ProfilerActivity, profile

    import unipred.nn.predictor as P

    for n in (4, 6):
        x, c = _inputs(n=n)
        valid = torch.ones(2, n * n + 1, dtype=torch.bool)
        valid[1, n * n - 3 :] = False
        _same_as_math_kernel(P, x, c, valid)
    x, c = _inputs()
    p = _pred().train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = p(x, c)
        out.float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert not any("flash_attention" in n for n in names), sorted(
        n for n in names if "attention" in n
    )
    # and fp32 keeps the default kernel choice (flash on CPU)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        p(x, c).sum().backward()
    assert any("flash_attention" in e.key for e in prof.key_averages())


def _fused_vs_apart(P, x, c, bf16=False, **kw):
    """Outputs and gradients with ``FUSED_QK`` on and off, same weights and RoPE draw."""
    torch.manual_seed(0)
    p = Predictor(PredictorConfig(dim=32, depth=2, heads=4, layerscale=0.5, **kw)).train()
    w = torch.randn(x.shape)
    res = []
    for fused in (False, True):
        P.FUSED_QK = fused
        try:
            xi = x.clone().requires_grad_()
            torch.manual_seed(3)  # the same random RoPE augmentation for both
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = p(xi, c).float()
            (out * w).sum().backward()  # a loss with a real gradient (not sum of a norm)
            res.append([xi.grad] + [q.grad.clone() for q in p.parameters()])
            p.zero_grad(set_to_none=True)
        finally:
            P.FUSED_QK = True
    return res


@pytest.mark.parametrize("kw", [{}, {"qk_norm_affine": True}, {"coord_dims": 3}])
def test_fused_qk_rope_and_layerscale_match_the_separate_ops(kw):
    """The default path (q and k through one QK-norm and one swapped-sign rotation, LayerScale
    and residual as one addcmul) gives the gradients of the op-by-op path. Affine QK-norms and
    partial rotations (3-D RoPE on 8-channel heads rotates 6) take the op-by-op path."""
    import unipred.nn.predictor as P

    x, c = _inputs()
    if kw.get("coord_dims") == 3:
        c = torch.cat([c, torch.zeros(len(c), 1)], 1)
    apart, fused = _fused_vs_apart(P, x, c, **kw)
    for a, b in zip(apart, fused):
        assert (a - b).norm() <= 1e-5 * a.norm(), (a - b).norm() / a.norm()
    # bf16 autocast: the fp32 residual sums round alike, bf16 casts after them may not
    apart, fused = _fused_vs_apart(P, x, c, bf16=True, **kw)
    for a, b in zip(apart, fused):
        assert (a - b).norm() <= 0.02 * a.norm(), (a - b).norm() / a.norm()


def test_swapped_rotation_is_apply_rope_exactly():
    """``_rope_swapped`` with the sign-folded sin table equals ``apply_rope`` bit for bit;
    with the plain sin table (a sign lost) it does not."""
    import unipred.nn.predictor as P

    p = _pred()
    cos, sin, ssin = p._rope_tables(grid_coords(4, 4), 1)
    x = torch.randn(2, 3, 4, 17, 8)
    assert torch.equal(P._rope_swapped(x, cos, ssin), apply_rope(x, cos, sin))
    assert not torch.allclose(P._rope_swapped(x, cos, sin), apply_rope(x, cos, sin))
