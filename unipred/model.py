"""NEPA = tokenizer + prefix (cls) token + predictor (+ a head).

Pretraining: the loss compares the predictor output at t with the raw input token at t+1.
Downstream: the same backbone, usually bidirectional, with a head on the pooled output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unipred.heads import ClassifierHead, LinearProbeHead
from unipred.loss import next_embedding_loss
from unipred.predictor import Predictor, PredictorConfig, PredictorOutput, init_weights
from unipred.registry import MODELS, TOKENIZERS


@dataclass
class ModelConfig:
    tokenizer: str = "image"
    tokenizer_args: dict[str, Any] = field(default_factory=lambda: {"patch_size": 14})
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    head: str | None = None  # None (pretraining) | "mean" | "last" | "probe"
    num_classes: int = 0
    init_std: float = 0.02


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # scalar next-embedding loss
    predictions: torch.Tensor  # (B, T, D) predictor output after the final norm
    targets: torch.Tensor  # (B, T, D) raw input tokens (cls + tokenizer output)
    valid: torch.Tensor | None  # (B, T) or None


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, num_classes)
    hidden: torch.Tensor  # (B, T, D)
    features: torch.Tensor  # (B, D) the head's input after pooling (and fc_norm)


class NEPA(nn.Module):
    n_prefix = 1  # the cls token

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        pc = cfg.predictor
        self.tokenizer = build_tokenizer(cfg.tokenizer, pc.dim, cfg.tokenizer_args)
        if self.tokenizer.coord_dims != pc.coord_dims:
            pc = dataclasses.replace(pc, coord_dims=self.tokenizer.coord_dims)
            cfg.predictor = pc
        self.cls_token = nn.Parameter(torch.zeros(1, 1, pc.dim))
        self.predictor = Predictor(pc)
        self.head = _build_head(cfg)
        init_weights(self, cfg.init_std)
        nn.init.trunc_normal_(self.cls_token, std=cfg.init_std)
        if cfg.head in ("mean", "last") and cfg.num_classes:
            # the release zeroes the classifier of a freshly converted model
            nn.init.zeros_(self.head.classifier.weight)
            nn.init.zeros_(self.head.classifier.bias)
        if isinstance(self.head, LinearProbeHead):
            nn.init.trunc_normal_(self.head.classifier.weight, std=0.01)

    @classmethod
    def from_name(cls, name: str, **overrides) -> NEPA:
        """Build a registered size, e.g. ``NEPA.from_name("nepa_vit_b14")``. Overrides may name
        ModelConfig fields (``num_classes=10``) or PredictorConfig fields (``depth=6``)."""
        return cls(model_config(name, **overrides))

    def embed(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Raw batch -> input sequence (B, T, D) = [cls, tokens], coords, valid (B, T) | None."""
        tk = self.tokenizer(x)
        B = tk.tokens.shape[0]
        seq = torch.cat([self.cls_token.expand(B, -1, -1).to(tk.tokens.dtype), tk.tokens], dim=1)
        valid = None
        if tk.valid is not None:
            pre = torch.ones(B, self.n_prefix, dtype=torch.bool, device=tk.valid.device)
            valid = torch.cat([pre, tk.valid.bool()], dim=1)
        return seq, tk.coords, valid

    def forward_features(self, x, layers=(), return_attn=False, causal=None) -> PredictorOutput:
        seq, coords, valid = self.embed(x)
        out = self.predictor.forward_features(seq, coords, valid, causal, layers, return_attn)
        out.inputs, out.valid = seq, valid  # handy for visualisation and the loss
        return out

    def forward(self, x, causal=None):
        seq, coords, valid = self.embed(x)
        hidden = self.predictor(seq, coords, valid, causal)
        if self.head is None:
            return PretrainOutput(next_embedding_loss(hidden, seq, valid), hidden, seq, valid)
        logits, feats = self.head(hidden, self.n_prefix, valid)
        return ClassifierOutput(logits, hidden, feats)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}


def build_tokenizer(name: str, dim: int, args: dict[str, Any]) -> nn.Module:
    """``TOKENIZERS[name](dim=dim, **args)``, with one-line errors for a broken contract."""
    cls = TOKENIZERS.get(name)
    try:
        tok = cls(dim=dim, **args)
    except TypeError as e:  # an argument the tokenizer does not take (or lacks)
        raise TypeError(f"tokenizer {name!r} with model.tokenizer_args={dict(args)}: {e}") from None
    if not isinstance(getattr(tok, "coord_dims", None), int):
        raise TypeError(
            f"tokenizer {name!r} ({cls.__module__}.{cls.__qualname__}) has no integer "
            f"'coord_dims' attribute (the number of coordinate axes of its tokens: 1 for a "
            f"sequence, 2 for an image grid)"
        )
    return tok


def _build_head(cfg: ModelConfig) -> nn.Module | None:
    if cfg.head is None:
        return None
    if cfg.num_classes < 1:
        raise ValueError(f"model.head={cfg.head!r} needs model.num_classes >= 1")
    d, eps = cfg.predictor.dim, cfg.predictor.norm_eps
    if cfg.head in ("mean", "last"):
        return ClassifierHead(d, cfg.num_classes, cfg.head, eps)
    if cfg.head == "probe":
        return LinearProbeHead(d, cfg.num_classes)
    raise ValueError(f"unknown model.head {cfg.head!r}; use None, 'mean', 'last' or 'probe'")


def model_config(name: str, **overrides) -> ModelConfig:
    cfg: ModelConfig = MODELS.get(name)()
    pfields = {f.name for f in dataclasses.fields(PredictorConfig)}
    mfields = {f.name for f in dataclasses.fields(ModelConfig)}
    pover = {k: v for k, v in overrides.items() if k in pfields}
    mover = {k: v for k, v in overrides.items() if k in mfields}
    unknown = set(overrides) - pfields - mfields
    if unknown:
        raise TypeError(f"unknown model option(s) {sorted(unknown)} for {name!r}")
    if "predictor" in mover and isinstance(mover["predictor"], PredictorConfig):
        cfg.predictor = mover.pop("predictor")
    if mover.get("tokenizer", cfg.tokenizer) != cfg.tokenizer and "tokenizer_args" not in mover:
        # the size's tokenizer arguments belong to its own tokenizer, not to the new one
        mover["tokenizer_args"] = {}
    cfg = dataclasses.replace(cfg, **mover)
    # RoPE's axis count is the tokenizer's (a class attribute), known before anything is built
    coord_dims = getattr(TOKENIZERS.get(cfg.tokenizer), "coord_dims", None)
    if isinstance(coord_dims, int):
        pover["coord_dims"] = coord_dims
    cfg.predictor = dataclasses.replace(cfg.predictor, **pover)
    return cfg


# ----------------------------------------------------------------------------- model sizes
def _vit(dim, depth, heads, patch=14, **kw) -> ModelConfig:
    return ModelConfig(
        tokenizer_args={"patch_size": patch},
        predictor=PredictorConfig(dim=dim, depth=depth, heads=heads, **kw),
    )


def _finetune(cfg: ModelConfig, drop_path: float, num_classes: int = 1000) -> ModelConfig:
    """The release's fine-tune config: bidirectional, affine QK-norm, drop path, mean head."""
    cfg.predictor = dataclasses.replace(
        cfg.predictor, causal=False, qk_norm_affine=True, drop_path=drop_path
    )
    return dataclasses.replace(cfg, head="mean", num_classes=num_classes)


@MODELS.register("nepa_vit_b14")
def nepa_vit_b14() -> ModelConfig:
    return _vit(768, 12, 12, qk_norm_affine=False)


@MODELS.register("nepa_vit_b14_cls")
def nepa_vit_b14_cls() -> ModelConfig:
    return _finetune(nepa_vit_b14(), 0.1)


@MODELS.register("nepa_vit_l14")
def nepa_vit_l14() -> ModelConfig:
    return _vit(1024, 24, 16, qk_norm_affine=True)


@MODELS.register("nepa_vit_l14_cls")
def nepa_vit_l14_cls() -> ModelConfig:
    return _finetune(nepa_vit_l14(), 0.2)


@MODELS.register("nepa_vit_s14")
def nepa_vit_s14() -> ModelConfig:
    return _vit(384, 12, 6, qk_norm_affine=True)


@MODELS.register("nepa_vit_ti14")
def nepa_vit_ti14() -> ModelConfig:
    return _vit(192, 12, 3, qk_norm_affine=True)


@MODELS.register("nepa_debug")
def nepa_debug() -> ModelConfig:
    """Tiny model for tests and smoke runs (patch 4 on 16-32 px images)."""
    return _vit(64, 2, 4, patch=4, qk_norm_affine=True)
