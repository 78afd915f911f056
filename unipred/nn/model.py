"""NEPA = tokenizer + prefix (cls) token + predictor (+ a head).

Pretraining: the loss compares the predictor output at t with the raw input token at t+1
(the release's objective; ``model.objective`` selects variants, see unipred/nn/objectives.py).
Downstream: the same backbone, usually bidirectional, with a head on the pooled output.
Optional register tokens sit after cls: prefix tokens, never targets, never pooled.

``ModelSection`` is the ``model:`` section of a run config (a registered size plus typed
overrides); ``build_model_config`` turns it into the core ``ModelConfig``.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unipred.base.registry import MODELS, TOKENIZERS
from unipred.nn import objectives
from unipred.nn.heads import ClassifierHead, LinearProbeHead
from unipred.nn.objectives import Objective, ObjectiveConfig
from unipred.nn.predictor import Predictor, PredictorConfig, PredictorOutput, init_weights
from unipred.nn.saving import PretrainedMixin


@dataclass
class ModelConfig:
    tokenizer: str = "image"
    tokenizer_args: dict[str, Any] = field(default_factory=lambda: {"patch_size": 14})
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    head: str | None = None  # None (pretraining) | "mean" | "last" | "probe"
    num_classes: int = 0
    init_std: float = 0.02
    registers: int = 0  # learned tokens after cls: no coordinates, never targets or pooled
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # pretraining only


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # scalar next-embedding loss
    predictions: torch.Tensor  # (B, T, D) predictor output after the final norm
    targets: torch.Tensor  # (B, T, D) raw input tokens (cls + tokenizer output); with
    #                        model.objective.target != "embedding", what the loss compared with
    valid: torch.Tensor | None  # (B, T) or None


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, num_classes)
    hidden: torch.Tensor  # (B, T, D)
    features: torch.Tensor  # (B, D) the head's input after pooling (and fc_norm)


class NEPA(PretrainedMixin, nn.Module):
    """A NEPA model. ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``: see
    unipred/weights/pretrained.py."""

    n_prefix = 1  # the cls token (+ model.registers)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        pc = cfg.predictor
        self.tokenizer = build_tokenizer(cfg.tokenizer, pc.dim, cfg.tokenizer_args)
        if self.tokenizer.coord_dims != pc.coord_dims:
            pc = dataclasses.replace(pc, coord_dims=self.tokenizer.coord_dims)
            cfg.predictor = pc
        self.cls_token = nn.Parameter(torch.zeros(1, 1, pc.dim))
        if cfg.registers < 0:
            raise ValueError(f"model.registers must be >= 0, got {cfg.registers}")
        if cfg.registers:
            self.n_prefix = 1 + cfg.registers
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, pc.dim))
        self.predictor = Predictor(pc)
        self.head = _build_head(cfg)
        if cfg.head is None:  # pretraining: the objective's own parameters (none by default)
            tdim = objectives.target_dim(self.tokenizer, cfg.objective, pc.dim)
            self.objective = Objective(cfg.objective, pc.dim, tdim, pc)
        init_weights(self, cfg.init_std)
        nn.init.trunc_normal_(self.cls_token, std=cfg.init_std)
        if cfg.registers:
            nn.init.trunc_normal_(self.register_tokens, std=cfg.init_std)
        if cfg.head is None and self.objective.mask_token is not None:
            nn.init.trunc_normal_(self.objective.mask_token, std=cfg.init_std)
        if cfg.head is None and cfg.objective.target == "ema":
            # the teacher starts as the student; the optimizer never sees it (no grad) and
            # downstream runs drop it with the rest of objective.*
            self.objective.teacher = copy.deepcopy(self.predictor).requires_grad_(False)
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
        """Raw batch -> input sequence (B, T, D) = [cls, registers, tokens], coords, valid."""
        tk = self.tokenizer(x)
        seq, valid = self.with_prefix(tk.tokens, tk.valid)
        return seq, tk.coords, valid

    def with_prefix(self, tokens, valid=None):
        """Tokens (B, N, D), valid (B, N) | None -> [cls, registers, tokens], valid (B, T)."""
        B = tokens.shape[0]
        pre = [self.cls_token.expand(B, -1, -1).to(tokens.dtype)]
        if self.n_prefix > 1:
            pre.append(self.register_tokens.expand(B, -1, -1).to(tokens.dtype))
        seq = torch.cat([*pre, tokens], dim=1)
        if valid is not None:
            ones = torch.ones(B, self.n_prefix, dtype=torch.bool, device=valid.device)
            valid = torch.cat([ones, valid.bool()], dim=1)
        return seq, valid

    def forward_features(self, x, layers=(), return_attn=False, causal=None) -> PredictorOutput:
        seq, coords, valid = self.embed(x)
        out = self.predictor.forward_features(seq, coords, valid, causal, layers, return_attn)
        # handy for visualisation, the loss and the protocols' spatial pooling (features.pool=grid)
        out.inputs, out.valid, out.coords = seq, valid, coords
        return out

    def forward(self, x, causal=None):
        if self.head is None:
            return self.pretrain(x, causal)
        seq, coords, valid = self.embed(x)
        hidden = self.predictor(seq, coords, valid, causal)
        logits, feats = self.head(hidden, self.n_prefix, valid)
        return ClassifierOutput(logits, hidden, feats)

    def pretrain(self, x, causal=None) -> PretrainOutput:
        """The next-embedding objective of ``cfg.objective`` (the release's by default)."""
        obj, ocfg = self.objective, self.cfg.objective
        tokens, coords, tvalid = self.tokenizer(x)
        patches = objectives.patch_targets(self.tokenizer, x) if ocfg.target == "patch" else None
        tokens, coords, tvalid, patches = obj.order(tokens, coords, tvalid, patches)
        seq, valid = self.with_prefix(obj.mask_inputs(tokens), tvalid)
        layers = (ocfg.target_layer,) if ocfg.target == "layer" else ()
        out = self.predictor.forward_features(seq, coords, valid, causal, layers)
        if ocfg.target == "embedding":  # the unmasked input sequence
            target = seq if obj.mask_token is None else self.with_prefix(tokens)[0]
        elif ocfg.target == "ema":
            if self.training and torch.is_grad_enabled():  # one EMA step per training forward
                objectives.ema_update(obj.teacher, self.predictor, ocfg.ema_momentum)
            clean = seq if obj.mask_token is None else self.with_prefix(tokens)[0]
            target = objectives.teacher_target(obj.teacher, clean, coords, valid,
                                               self.n_prefix, ocfg)  # fmt: skip
        elif ocfg.target == "layer":
            target = objectives.layer_target(out, len(self.predictor.blocks), ocfg.target_layer)
        else:  # prefix rows are never targets: zeros keep the positions aligned
            target = torch.cat([patches.new_zeros(patches.shape[0], self.n_prefix,
                                                  patches.shape[2]), patches], 1)  # fmt: skip
        hidden = obj.transform(out.hidden, coords, valid, causal)  # head=transformer only
        loss = obj.loss(hidden, target, valid, self.n_prefix)
        # the trunk's output (the features kept) is what the collapse monitor watches
        return PretrainOutput(loss, out.hidden, target, valid)

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
# --------------------------------------------------------------- the config's model: section
def _overrides_of(cls: type) -> type:
    """A dataclass with every field of ``cls`` made optional (None = keep the size's value)."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, hints[f.name] | None, field(default=None)) for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"{cls.__name__}Overrides", fields)


PredictorOverrides = _overrides_of(PredictorConfig)
ObjectiveOverrides = _overrides_of(ObjectiveConfig)


@dataclass
class ModelSection:
    """Which model: a registered size plus typed overrides of its predictor and head."""

    name: str = "nepa_debug"  # a size registered in MODELS (unipred list)
    tokenizer: str | None = None  # None = the size's tokenizer
    tokenizer_args: dict[str, Any] = field(default_factory=dict)  # merged over the size's
    predictor: PredictorOverrides = field(default_factory=PredictorOverrides)
    head: str | None = None  # None = the task's/size's default; "none" forces no head
    num_classes: int | None = None
    init_std: float | None = None
    registers: int | None = None  # register tokens after cls (never targets, never pooled)
    # variants of the pretraining objective (docs/objectives.md); unset = the release's
    objective: ObjectiveOverrides = field(default_factory=ObjectiveOverrides)
    # "" | "official:PATH" (released NEPA weights) | "ckpt:PATH" (our checkpoint, weights only)
    # | "pretrain:PATH[:ema][@SOURCE]" (pretraining ckpt -> classifier: backbone copied, classifier
    # zeroed; @SOURCE picks a joint checkpoint's source, docs/joint.md)
    init: str = ""


def _set_fields(section) -> dict:
    """The fields of an overrides dataclass that a config sets (not None)."""
    out = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return {k: v for k, v in out.items() if v is not None}


_ZERO_MEANS_OFF = ("layerscale", "rope_shift", "rope_jitter", "rope_rescale")


def build_model_config(section: ModelSection, **defaults):
    """ModelSection (+ task defaults for fields the config leaves None) -> core ModelConfig."""
    over: dict[str, Any] = {k: v for k, v in defaults.items() if v is not None}
    for k in ("head", "num_classes", "init_std", "tokenizer", "registers"):
        v = getattr(section, k)
        if v is not None:
            over[k] = v
    if over.get("head") == "none":
        over["head"] = None
    mc = model_config(section.name, **over)
    if section.tokenizer_args:
        mc.tokenizer_args = {**mc.tokenizer_args, **section.tokenizer_args}
    pover = {
        f.name: getattr(section.predictor, f.name) for f in dataclasses.fields(section.predictor)
    }
    pover = {k: v for k, v in pover.items() if v is not None}
    for k in _ZERO_MEANS_OFF:  # the core's None (= off) is written 0 in a config
        if pover.get(k) == 0:
            pover[k] = None
    mc.predictor = dataclasses.replace(mc.predictor, **pover)
    mc.objective = dataclasses.replace(mc.objective, **_set_fields(section.objective))
    return mc
