"""Variants of the next-embedding objective: the NEPA paper's ablations and its successors'.

``ObjectiveConfig`` (the ``model.objective`` section of a run config) selects them; its defaults
are the release's objective, computed with the same operations in the same order, so the
default loss is bit-for-bit the release's (tests/test_parity.py). What each switch does and
which paper uses it: docs/objectives.md. The pieces, in the order ``NEPA.pretrain`` applies
them:

1. ``order``: permute the tokenizer's tokens (reverse, a fixed or a per-sample random
   permutation); coordinates, validity and patch targets travel with them, so RoPE still
   says where each token is.
2. ``mask_ratio``: replace that fraction of each sample's input tokens by a learned mask token
   (the targets stay the unmasked embeddings).
3. ``target``: what position t is compared with: the input embedding (release), the output of
   block ``target_layer``, or the tokenizer's raw patch (pixels, log-mel, voxels), normalised
   per patch. ``stop_grad`` detaches it (release) or lets the loss train the target side.
   ``target_norm`` optionally centres (and scales) each feature of the targets over the
   sample's tokens, as data2vec normalises its targets (the release: unchanged).
4. ``shift`` / ``horizon``: output t predicts the targets at t + s, ..., t + s + K - 1
   (s = 1 with the shift, 0 without); one output head per step, losses averaged.
5. ``head``: an optional MLP, or a small transformer (I-JEPA's narrow predictor: ``head_depth``
   blocks of the trunk's kind, with its attention and RoPE, then a linear map per step),
   between the trunk and the loss; ``loss`` the comparison (cosine, MSE, smooth L1, InfoNCE
   over the other positions of the same sample, of the whole batch: infonce_batch, or over
   the same position of every sample: infonce_position).

Prefix tokens (cls and registers) are never targets; they can only predict the first tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from unipred.nn.loss import LOSSES, pair_loss
from unipred.nn.predictor import Predictor

TARGETS = ("embedding", "layer", "patch", "ema")
ORDERS = ("tokenizer", "reverse", "random_fixed", "random")
HEADS = ("none", "mlp", "transformer")
TARGET_NORMS = ("none", "center", "instance")


@dataclass
class ObjectiveConfig:
    shift: bool = True  # False: output t predicts target t (the paper's "no shift" ablation)
    stop_grad: bool = True  # False: gradient also flows into the targets
    mask_ratio: float = 0.0  # fraction of input tokens replaced by a learned mask token
    loss: str = "cosine"  # cosine | mse | smooth_l1 | infonce | infonce_batch | infonce_position
    temperature: float = 0.1  # infonce only
    target: str = "embedding"  # embedding | layer | patch | ema
    target_layer: int = -1  # target == "layer": that block's output (negative: from the top)
    horizon: int = 1  # K: predict the next K targets, losses averaged
    order: str = "tokenizer"  # tokenizer | reverse | random_fixed | random (per sample)
    order_seed: int = 0  # seed of the random_fixed permutation
    head: str = "none"  # none | mlp | transformer: predictor head between trunk and loss
    head_ratio: float = 2.0  # mlp head hidden width / model width
    head_depth: int = 1  # transformer head: blocks (the trunk's width, heads and attention)
    # none | center | instance: per feature, subtract the mean over the sample's target tokens
    # (center), and divide by their std (instance, data2vec's instance norm); after stop_grad
    target_norm: str = "none"
    # target == "ema" (data2vec / I-JEPA): a teacher, an EMA copy of the predictor, reads the
    # student's token embeddings (detached, unmasked) and its top ema_layers block outputs
    # (each instance-normalised when averaging more than one) are the targets
    ema_momentum: float = 0.996  # teacher <- m * teacher + (1 - m) * student, every step
    ema_layers: int = 1  # average of the teacher's top K block outputs
    ema_causal: bool = False  # the teacher's attention: bidirectional (sees every token)
    # choose target_norm / head / horizon from the data's sizes when the model is built
    # (unipred.task.auto; one line says what and why); keys the config sets are kept
    auto: bool = False

    def __post_init__(self):
        for key, value, allowed in (
            ("loss", self.loss, LOSSES),
            ("target", self.target, TARGETS),
            ("order", self.order, ORDERS),
            ("head", self.head, HEADS),
            ("target_norm", self.target_norm, TARGET_NORMS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"model.objective.{key}: {value!r} is not one of {', '.join(allowed)}"
                )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"model.objective.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.horizon < 1:
            raise ValueError(f"model.objective.horizon must be >= 1, got {self.horizon}")
        if self.temperature <= 0:
            raise ValueError(f"model.objective.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"model.objective.ema_momentum must be in [0, 1], got "
                             f"{self.ema_momentum}")  # fmt: skip
        if self.ema_layers < 1:
            raise ValueError(f"model.objective.ema_layers must be >= 1, got {self.ema_layers}")
        if self.head_depth < 1:
            raise ValueError(f"model.objective.head_depth must be >= 1, got {self.head_depth}")
        if self.head_ratio <= 0:
            raise ValueError(f"model.objective.head_ratio must be > 0, got {self.head_ratio}")

    @property
    def offsets(self) -> list[int]:
        """How far ahead each output head predicts: [1] for the release."""
        first = 1 if self.shift else 0
        return list(range(first, first + self.horizon))


# ------------------------------------------------------------------------------ token order
def order_keys(kind: str, n: int, batch: int, seed: int, device) -> torch.Tensor | None:
    """Rank of each tokenizer position in the new order: (N,) or (B, N); None = unchanged."""
    if kind == "tokenizer":
        return None
    if kind == "reverse":
        return torch.arange(n - 1, -1, -1, device=device, dtype=torch.float32)
    if kind == "random_fixed":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=g).float().to(device)
    return torch.rand(batch, n, device=device)  # "random": a new permutation per sample


def permutation(keys: torch.Tensor, valid: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(B, N) gather indices sorting tokens by ``keys``; padded tokens go last, so a clip's
    real tokens stay contiguous (the loss pairs only real neighbours)."""
    keys = keys.expand(batch, -1)
    if valid is not None:
        keys = keys + (~valid.bool()).float() * (keys.abs().max() + 1.0) * 2
    return keys.argsort(dim=1, stable=True)


def permute(perm: torch.Tensor, tokens, coords, valid=None, patches=None):
    """Apply (B, N) gather indices to tokens (B, N, D), coords (N, k)|(B, N, k), valid (B, N)
    and patches (B, N, P); coordinates become per sample (B, N, k)."""
    B, N = perm.shape

    def take(x):
        return x.gather(1, perm[..., None].expand(-1, -1, x.shape[-1]))

    tokens = take(tokens)
    coords = take(coords.expand(B, N, coords.shape[-1]))
    valid = None if valid is None else valid.gather(1, perm)
    patches = None if patches is None else take(patches)
    return tokens, coords, valid, patches


def random_mask(batch: int, n: int, ratio: float, device) -> torch.Tensor:
    """(B, N) bool with round(ratio * N) True positions per sample, chosen uniformly."""
    k = int(round(ratio * n))
    rank = torch.rand(batch, n, device=device).argsort(dim=1).argsort(dim=1)
    return rank < k


def normalise_patches(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance (MAE's norm_pix_loss), in float32."""
    p = p.float()
    mean, var = p.mean(dim=-1, keepdim=True), p.var(dim=-1, keepdim=True, unbiased=False)
    return (p - mean) / (var + eps).sqrt()


def normalise_targets(
    target: torch.Tensor, valid: torch.Tensor | None, n_prefix: int, kind: str, eps: float = 1e-6
) -> torch.Tensor:
    """Per sample and feature, centre the target tokens (B, T, D) over the sample's real,
    non-prefix tokens (``center``) and scale them to unit variance (``instance``), in float32.
    Prefix rows (never targets) are returned as they are. ``none``: ``target`` unchanged."""
    if kind == "none":
        return target
    head, t = target[:, :n_prefix].float(), target[:, n_prefix:].float()
    w = (
        t.new_ones(t.shape[0], t.shape[1], 1)
        if valid is None
        else valid[:, n_prefix:, None].float()
    )
    count = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    t = t - (t * w).sum(dim=1, keepdim=True) / count
    if kind == "instance":
        t = t / ((t.pow(2) * w).sum(dim=1, keepdim=True) / count + eps).sqrt()
    return torch.cat([head, t], dim=1)


# ---------------------------------------------------------------------------- output heads
class MLPHead(nn.Module):
    """Linear -> GELU -> Linear: the optional predictor head between trunk and loss."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Objective(nn.Module):
    """Parameters and steps of the objective. Holds nothing for the release's defaults."""

    def __init__(self, cfg: ObjectiveConfig, dim: int, target_dim: int, predictor=None):
        """``predictor``: the trunk's PredictorConfig, the shape of a transformer head."""
        super().__init__()
        self.cfg = cfg
        self.trunk_head = None  # head == "transformer": blocks on the trunk's output
        if cfg.head == "transformer":
            if predictor is None or predictor.dim != dim:
                raise ValueError("model.objective.head='transformer' needs the trunk's "
                                 "predictor config (its width, heads and RoPE)")  # fmt: skip
            # no stochastic depth in the head: its blocks are not the features kept
            self.trunk_head = Predictor(
                dataclasses.replace(predictor, depth=cfg.head_depth, drop_path=0.0)
            )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.mask_ratio > 0 else None
        hidden = max(1, int(round(dim * cfg.head_ratio)))

        def make(k: int) -> nn.Module:
            if cfg.head == "mlp":
                return MLPHead(dim, hidden, target_dim)
            if k == 0 and target_dim == dim:
                return nn.Identity()  # the release: the trunk's output is the prediction
            return nn.Linear(dim, target_dim)  # a small head per further step, or to P values

        self.heads = nn.ModuleList(make(k) for k in range(cfg.horizon))

    def transform(self, hidden, coords, valid, causal=None):
        """The trunk's output through the transformer head (``head=transformer``; the trunk's
        attention, so a causal trunk keeps a causal objective), else unchanged."""
        if self.trunk_head is None:
            return hidden
        return self.trunk_head(hidden, coords, valid, causal)

    def order(self, tokens, coords, valid, patches):
        keys = order_keys(
            self.cfg.order, tokens.shape[1], tokens.shape[0], self.cfg.order_seed, tokens.device
        )
        if keys is None:
            return tokens, coords, valid, patches
        return permute(permutation(keys, valid, tokens.shape[0]), tokens, coords, valid, patches)

    def mask_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask_token is None:
            return tokens
        B, N, _ = tokens.shape
        m = random_mask(B, N, self.cfg.mask_ratio, tokens.device)[..., None]
        return torch.where(m, self.mask_token.to(tokens.dtype), tokens)

    def loss(self, hidden, target, valid, n_prefix: int) -> torch.Tensor:
        """Average over the horizon of the loss between head k's output at t and the target at
        t + offset_k, over positions whose target is a real (non-prefix, non-padded) token."""
        T = hidden.shape[1]
        target = target.detach() if self.cfg.stop_grad else target
        target = normalise_targets(target, valid, n_prefix, self.cfg.target_norm)
        losses = []
        for head, off in zip(self.heads, self.cfg.offsets):
            j0 = max(n_prefix, off)  # first target position: a token, with a source before it
            if j0 >= T:
                raise ValueError(
                    f"model.objective.horizon {self.cfg.horizon}: sequences of {T} tokens "
                    f"({n_prefix} prefix) have no target {off} steps ahead"
                )
            pred = head(hidden[:, j0 - off : T - off])
            pair = None if valid is None else valid[:, j0 - off : T - off] & valid[:, j0:]
            losses.append(
                pair_loss(pred, target[:, j0:], pair, self.cfg.loss, self.cfg.temperature)
            )
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def patch_targets(tokenizer, x) -> torch.Tensor:
    """The tokenizer's raw patches (B, N, P), normalised per patch, in token order."""
    if not hasattr(tokenizer, "patches"):
        raise ValueError(
            f"model.objective.target='patch' needs a tokenizer with a patches() method; "
            f"{type(tokenizer).__name__} has none"
        )
    return normalise_patches(tokenizer.patches(x))


def target_dim(tokenizer, cfg: ObjectiveConfig, dim: int) -> int:
    """Width of the objective's targets: the model width, or the raw patch size."""
    if cfg.target != "patch":
        return dim
    if not hasattr(tokenizer, "patch_dim"):
        raise ValueError(
            f"model.objective.target='patch' needs a tokenizer with patches(); "
            f"{type(tokenizer).__name__} has none"
        )
    return tokenizer.patch_dim


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)


@torch.no_grad()
def teacher_target(teacher, seq, coords, valid, n_prefix: int, cfg: ObjectiveConfig):
    """The EMA teacher's targets (B, T, D): its top ``ema_layers`` block outputs on ``seq``
    (the student's unmasked input sequence, detached), averaged after instance-normalising
    each over the sample's tokens (data2vec) when there are several."""
    depth = len(teacher.blocks)
    k = min(cfg.ema_layers, depth)
    teacher.train(False)  # no drop path, no coordinate augmentation in the teacher
    out = teacher.forward_features(seq.detach(), coords, valid, cfg.ema_causal,
                                   tuple(range(depth - k, depth)))  # fmt: skip
    if k == 1:
        return out.layers[0]
    return torch.stack([normalise_targets(h, valid, n_prefix, "instance") for h in out.layers]
                       ).mean(0)  # fmt: skip


def layer_target(out, depth: int, k: int) -> torch.Tensor:
    if not -depth <= k < depth:
        raise ValueError(f"model.objective.target_layer {k} is outside the {depth} blocks")
    return out.layers[0]
