"""The causal next-embedding predictor: a pre-norm transformer over any token sequence.

Read top to bottom: config, attention, MLP, block, Predictor. Modality-agnostic: it sees
tokens (B, T, D) whose last N carry k-D coordinates (N, k) or (B, N, k); the leading T - N
"prefix" tokens (cls) carry none and are never rotated. Attention goes through
``F.scaled_dot_product_attention``; an eager path exists only to return attention maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from unipred.nn.rope import AxialRoPE, apply_rope, lift_coords


@dataclass
class PredictorConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    mlp: str = "gelu"  # gelu | swiglu | geglu | silu  (swiglu/geglu are gated)
    qkv_bias: bool = True
    qk_norm: bool = True
    qk_norm_affine: bool = False
    layerscale: float | None = 1e-5  # None disables LayerScale on both branches
    drop_path: float = 0.0  # rate of the last block; linear from 0 over depth
    norm_eps: float = 1e-12
    causal: bool = True
    coord_dims: int = 2
    rope_theta: float = 100.0
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = 2.0
    # a shared RoPE coordinate space (joint pretraining, docs/joint.md): the tokenizer's
    # coordinate i sits on RoPE axis rope_axes[i] of rope_space axes, the others fixed at 0;
    # None / 0 = the tokenizer's own coordinates (the release)
    rope_axes: list[int] | None = None
    rope_space: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def rope_dims(self) -> int:
        """Axes of the RoPE: ``rope_space`` when set, else the tokenizer's ``coord_dims``."""
        return self.rope_space or self.coord_dims

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    def __post_init__(self):
        if self.heads < 1 or self.dim < 1:
            raise ValueError(
                f"model.predictor.dim={self.dim} and model.predictor.heads={self.heads} "
                "must both be at least 1"
            )
        if self.dim % self.heads:
            raise ValueError(
                f"model.predictor.dim={self.dim} is not divisible by "
                f"model.predictor.heads={self.heads}"
            )
        if self.mlp not in _MLP_KINDS:
            raise ValueError(f"predictor mlp must be one of {sorted(_MLP_KINDS)}, got {self.mlp!r}")
        if self.rope_axes is not None:
            axes = [int(a) for a in self.rope_axes]
            if len(axes) != self.coord_dims or len(set(axes)) != len(axes):
                raise ValueError(
                    f"model.predictor.rope_axes={axes} must name {self.coord_dims} distinct "
                    f"axes (one per coordinate of the tokenizer)"
                )
            if min(axes) < 0 or max(axes) >= self.rope_dims:
                raise ValueError(
                    f"model.predictor.rope_axes={axes} must lie in [0, {self.rope_dims}) "
                    f"(model.predictor.rope_space={self.rope_space})"
                )


# name -> (gated, activation)
_MLP_KINDS = {
    "gelu": (False, "gelu"),
    "silu": (False, "silu"),
    "swiglu": (True, "silu"),
    "geglu": (True, "gelu"),
}
_ACTS = {"gelu": nn.GELU, "silu": nn.SiLU}


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale survivors."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)  # fused q|k|v
        if cfg.qk_norm:
            mk = lambda: nn.LayerNorm(  # noqa: E731
                cfg.head_dim, eps=cfg.norm_eps, elementwise_affine=cfg.qk_norm_affine, bias=False
            )
            self.q_norm, self.k_norm = mk(), mk()
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        # without weights the two QK-norms are one function: q and k can share one call
        self._shared_qk_norm = cfg.qk_norm and not cfg.qk_norm_affine

    def forward(self, x, rope, n_prefix, mask, causal, return_attn=False):
        B, T, D = x.shape
        # (B, T, 3D) -> (3, B, H, T, d)
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if FUSED_QK and self._shared_qk_norm and _full_rope(rope, T, self.head_dim):
            # q and k through one QK-norm and one rotation (see _rope_swapped)
            qk = _rope_swapped(self.q_norm(qkv[:2]), rope[0], rope[2])
            (q, k), v = qk.unbind(0), qkv[2]
        else:
            q, k = self._norm_rope(qkv, rope, n_prefix, T)
            v = qkv[2]
        attn = None
        if return_attn:
            out, attn = _eager_attention(q, k, v, mask, causal)
        else:
            out = _sdpa(q, k, v, mask, causal and mask is None)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, H, T, d) -> (B, T, D)
        return self.proj(out), attn

    def _norm_rope(self, qkv, rope, n_prefix: int, T: int):
        """QK-norm then RoPE, q and k apart: affine QK-norms, or a rotation of fewer channels
        than the head or of fewer tokens than the sequence."""
        q, k, _ = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # before RoPE, on every token (cls too)
        if rope is not None:
            cos, sin = rope[0], rope[1]
            if cos.shape[-2] == T:  # prefix rows are identity (see _identity_prefix): no slicing
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            else:
                q = torch.cat([q[:, :, :n_prefix], apply_rope(q[:, :, n_prefix:], cos, sin)], 2)
                k = torch.cat([k[:, :, :n_prefix], apply_rope(k[:, :, n_prefix:], cos, sin)], 2)
        return q, k


# False restores the q-and-k-apart path everywhere (benchmarks/cpu_profile.py times both)
FUSED_QK = True


def _full_rope(rope, T: int, head_dim: int) -> bool:
    """Whether ``rope`` (cos, sin, swapped sin) rotates every channel of all T tokens."""
    return rope is not None and rope[0].shape[-2] == T and rope[0].shape[-1] == head_dim


def _rope_swapped(x, cos, ssin):
    """``apply_rope`` for a tensor whose every channel is rotated, in fewer ops: rotate-half
    ``cat([-h2, h1]) * sin`` equals ``cat([h2, h1]) * cat([-s1, s2])`` exactly (a sign moved
    between factors), so the rotation is one flip of the halves and two products, with no
    negation, slicing or concatenation (nor their backward passes). ``ssin`` is the second
    form's sign-folded sin table (``Predictor._rope_tables``); cos/ssin (T, d) or (B, T, d)
    broadcast over heads, and over a leading q|k axis of x."""
    if cos.dim() == 3:
        cos, ssin = cos.unsqueeze(1), ssin.unsqueeze(1)
    xf = x.float()  # one upcast (a no-op in fp32), as apply_rope
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [h1 | h2] -> [h2 | h1]
    return (xf * cos + swapped * ssin).to(x.dtype)


def _sdpa(q, k, v, mask, is_causal):
    """SDPA (flash / memory-efficient kernels on GPUs). On CPU in bf16/fp16: ``_cpu_attention``
    (torch's CPU flash-attention backward is several times slower in bf16 than in fp32, which
    cancelled bf16's gain; measured on the demo model: whole step 2.1x faster without it)."""
    if q.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or v.dtype != torch.float32):
        if CPU_ATTENTION == "math":  # the previous path, kept for benchmarks/cpu_profile.py
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return _cpu_attention(q, k, v, mask, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


# "explicit" (default) or "math": how CPU attention runs in reduced precision (see _sdpa)
CPU_ATTENTION = "explicit"


def _cpu_attention(q, k, v, mask, is_causal):
    """What SDPA's math kernel computes on CPU in bf16 (it upcasts q, k, v to fp32), faster.

    Up to ``_EXPLICIT_MAX_TOKENS`` tokens as explicit fp32 ops: no "safe softmax" pass (two
    reductions over the scores) and no scaling of both q and k (the demo model, 17 tokens:
    fwd + bwd 5.9 -> 4.6 ms per block). Longer sequences: SDPA on the fp32 copies, where torch
    picks its CPU flash kernel, whose fp32 backward is fast (65 tokens 10.1 -> 8.0 ms, ViT-B/14's
    257 tokens at batch 8 112 -> 89 ms per block; benchmarks/README.md). Every row sees at
    least itself (``_attention_mask``), so no row is fully masked."""
    T, S = q.shape[-2], k.shape[-2]
    with torch.autocast("cpu", enabled=False):  # fp32 products, as the math kernel
        q, k, v32 = q.float(), k.float(), v.float()
        if max(T, S) > _EXPLICIT_MAX_TOKENS:
            out = F.scaled_dot_product_attention(q, k, v32, attn_mask=mask, is_causal=is_causal)
            return out.to(v.dtype)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if is_causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(dim=-1) @ v32).to(v.dtype)


_EXPLICIT_MAX_TOKENS = 32  # explicit ops win at 17 tokens, SDPA's fp32 flash kernel at 65


def _eager_attention(q, k, v, mask, causal):
    """Reference attention that also returns the (B, H, T, T) probabilities (fp32 softmax)."""
    T = q.shape[2]
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal and mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return (probs @ v.float()).to(v.dtype), probs


class MLP(nn.Module):
    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.gated, act = _MLP_KINDS[cfg.mlp]
        h = cfg.mlp_hidden
        self.fc1 = nn.Linear(cfg.dim, 2 * h if self.gated else h)  # gated: [gate | up]
        self.act = _ACTS[act]()
        self.fc2 = nn.Linear(h, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(self.act(gate) * up)
        return self.fc2(self.act(h))


class Block(nn.Module):
    def __init__(self, cfg: PredictorConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        ls = cfg.layerscale
        self.ls1 = LayerScale(cfg.dim, ls) if ls is not None else nn.Identity()
        self.ls2 = LayerScale(cfg.dim, ls) if ls is not None else nn.Identity()
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    def forward(self, x, rope, n_prefix, mask, causal, return_attn=False):
        a, attn = self.attn(self.norm1(x), rope, n_prefix, mask, causal, return_attn)
        x = self._residual(x, a, self.ls1, self.drop_path1)
        x = self._residual(x, self.mlp(self.norm2(x)), self.ls2, self.drop_path2)
        return x, attn

    @staticmethod
    def _residual(x, branch, ls, drop):
        """x + drop(ls(branch)); with LayerScale and no drop as one ``addcmul`` (one pass over
        the activations instead of a product and a sum, forward and backward)."""
        if FUSED_QK and isinstance(ls, LayerScale) and (drop.p == 0.0 or not drop.training):
            return torch.addcmul(x, branch, ls.gamma)
        return x + drop(ls(branch))


@dataclass
class PredictorOutput:
    hidden: torch.Tensor  # (B, T, D) after the final norm
    layers: list[torch.Tensor]  # requested block outputs (B, T, D), before the final norm
    attentions: list[torch.Tensor]  # (B, H, T, T) per block, only when asked for


class Predictor(nn.Module):
    """Pre-norm transformer with k-D RoPE, QK-norm, LayerScale and a final LayerNorm."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.rope = AxialRoPE(
            cfg.head_dim, cfg.rope_dims, cfg.rope_theta,
            cfg.rope_shift, cfg.rope_jitter, cfg.rope_rescale,
        )  # fmt: skip
        # linear over depth: block 0 gets 0, the last block the full rate
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.grad_checkpointing = False

    def forward(self, tokens, coords, valid=None, causal=None) -> torch.Tensor:
        """tokens (B, T, D), coords (N, k) or (B, N, k) for the last N tokens -> (B, T, D)."""
        return self.forward_features(tokens, coords, valid, causal).hidden

    def forward_features(
        self, tokens, coords, valid=None, causal=None, layers=(), return_attn=False
    ) -> PredictorOutput:
        B, T, D = tokens.shape
        if D != self.cfg.dim:
            raise ValueError(
                f"Predictor expects width {self.cfg.dim}, got tokens {tuple(tokens.shape)}"
            )
        n_prefix = T - coords.shape[-2]
        if n_prefix < 0:
            raise ValueError(f"coords {tuple(coords.shape)} cover more than the {T} tokens")
        causal = self.cfg.causal if causal is None else causal
        mask = _attention_mask(valid, causal, B, T, tokens.device)
        if self.cfg.rope_axes is not None:
            coords = lift_coords(coords, self.cfg.rope_axes, self.cfg.rope_dims)
        rope = self._rope_tables(coords.to(tokens.device), n_prefix)
        keep, attns = [], []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and not return_attn:
                x, a = checkpoint(blk, tokens, rope, n_prefix, mask, causal, use_reentrant=False)
            else:
                x, a = blk(tokens, rope, n_prefix, mask, causal, return_attn)
            tokens = x
            if i in layers or (i - len(self.blocks)) in layers:
                keep.append(tokens)
            if a is not None:
                attns.append(a)
        return PredictorOutput(self.norm(tokens), keep, attns)

    def _rope_tables(self, coords, n_prefix: int):
        """(cos, sin, swapped sin) for the whole sequence, once per forward (every block
        shares them): prefix rows are the identity, the third is ``_rope_swapped``'s table."""
        cos, sin = _identity_prefix(self.rope.tables(coords), n_prefix)
        s1, s2 = sin.chunk(2, dim=-1)
        return cos, sin, torch.cat([-s1, s2], dim=-1)


def _identity_prefix(rope, n_prefix: int):
    """Prepend cos = 1, sin = 0 rows for the prefix tokens, so RoPE runs on the whole sequence.

    Exact: x * 1 + r * 0 == x. It spares, per block, slicing q and k into prefix and patches,
    re-concatenating them, and the zero-filled slice gradients of the backward pass.
    """
    if not n_prefix:
        return rope
    cos, sin = rope
    shape = (*cos.shape[:-2], n_prefix, cos.shape[-1])
    return torch.cat([cos.new_ones(shape), cos], -2), torch.cat([sin.new_zeros(shape), sin], -2)


def _attention_mask(valid, causal, B, T, device):
    """Boolean (B, 1, T, T) mask (True = may attend), or None when SDPA's own flag suffices.

    ``valid.all()`` costs one host sync per forward (and a graph break under torch.compile)
    for tokenizers that always return a mask (audio, video); it is kept on purpose: an
    unpadded batch then runs SDPA with ``is_causal`` and no mask, which keeps the fused
    flash/cuDNN kernels (ViT-B/14 batch 256 on an H100: cuDNN attention 19.7 ms per step, the
    memory-efficient kernel that a mask would need 33.7 ms). Image batches carry no mask.
    """
    if valid is None or bool(valid.all()):
        return None
    if valid.shape != (B, T):
        raise ValueError(f"valid mask must be (B, T) = {(B, T)}, got {tuple(valid.shape)}")
    mask = valid[:, None, None, :].expand(B, 1, T, T)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    # a padded query that could see no key would give NaN rows: let it see itself
    return mask | torch.eye(T, dtype=torch.bool, device=device)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Official NEPA/HF-ViT init: truncated normal(0.02) weights, zero bias, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.Conv1d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
