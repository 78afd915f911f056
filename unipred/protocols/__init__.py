"""Evaluation protocols of self-supervised backbones, for any modality.

Every protocol consumes a backbone and a labelled dataset, nothing else: the backbone is any
module with ``forward_features(x, layers=...)`` returning ``hidden`` (B, T, D, after the final
norm), ``layers`` (the requested block outputs) and ``valid`` (B, T) or None, and an
``n_prefix`` attribute (leading tokens that are not patches, e.g. cls); the data are the
``train`` / ``val`` splits of a classification task (``Task.feature_dataset``), with labels
as the second element of each batch.

* ``knn``: DINO's weighted k-nearest-neighbour classifier on L2-normalised pooled features,
  cosine similarity, k = 20, votes weighted by exp(similarity / 0.07).
* ``linear``: MAE's linear probe (BatchNorm without affine + one linear layer) on pooled
  features of the frozen backbone in eval mode; features are computed once and cached unless
  ``linear.augment=true`` (then the task's training pipeline is run every epoch).
* ``attentive``: V-JEPA's attentive probe: one learned query cross-attends to all patch
  tokens of the frozen backbone (one cross-attention block with its MLP), then a linear layer.
* ``layers``: one linear probe on the pooled output of every block, plus the final norm, all
  trained together on features of one pass over the data; prints accuracy per layer, names
  the best one.
* ``finetune``: the task's own training run (engine.fit) from the checkpoint's backbone.

The frozen protocols share one feature pass per weight set (raw / EMA): ``run_protocols``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unipred.nn.heads import LinearProbeHead, pool_tokens

FROZEN = ("knn", "linear", "attentive", "layers")
PROTOCOLS = (*FROZEN, "finetune")


RANDOM = "random"  # ckpt=random: the random-init baseline


class ProtocolError(ValueError):
    """Bad protocol settings or data; the message names the key or the problem."""


# ------------------------------------------------------------------------------- settings
@dataclass
class KNNSettings:
    k: int = 20  # DINO's protocol
    temperature: float = 0.07


@dataclass
class ProbeSettings:
    """Training of a probe on frozen features (AdamW, cosine schedule, no warmup)."""

    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch: int = 1024
    augment: bool = False  # linear only: run the training pipeline every epoch (no cache)


@dataclass
class AttentiveSettings:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01  # V-JEPA's attentive probe
    batch: int = 256
    heads: int = 0  # 0 = the backbone's head count
    mlp_ratio: float = 4.0


@dataclass
class FeatureSettings:
    batch: int = 256  # batch of the feature pass
    pool: str = "mean"  # mean over patch tokens | last | cls
    # k-NN and linear read this block's output (negative: from the top) instead of the final
    # norm; autoregressive models probe best in the middle (iGPT, AIM)
    block: int | None = None
    max_train: int = 0  # use the first N training samples (0 = all)
    max_val: int = 0
    num_workers: int = -1  # -1 = data.num_workers


@dataclass
class RawSettings:
    """The raw-input baseline (unipred.baselines): flattened patches of the tokenizer."""

    max_dim: int = 4096  # values per sample above which each patch is averaged down


@dataclass
class EvalSettings:
    """The ``unipred eval`` / ``evaluate-suite`` keys that are not run-config keys."""

    protocol: str = ""  # "" = the task's own validation (engine.evaluate)
    protocols: list[str] = field(default_factory=lambda: list(FROZEN))  # evaluate-suite
    ema: str = "both"  # true | false | both (raw and EMA weights)
    out: str = ""  # evaluate-suite: results folder ("" = <run folder of ckpt>/eval)
    seed: int = 0  # probe initialisation and batch order
    knn: KNNSettings = field(default_factory=KNNSettings)
    linear: ProbeSettings = field(default_factory=ProbeSettings)
    attentive: AttentiveSettings = field(default_factory=AttentiveSettings)
    layers: ProbeSettings = field(default_factory=ProbeSettings)  # the linear probe's recipe
    features: FeatureSettings = field(default_factory=FeatureSettings)
    # print the random-init backbone, the raw input and the data source's own baselines
    # beside the backbone's rows (unipred.baselines)
    baselines: bool = True
    raw: RawSettings = field(default_factory=RawSettings)


EVAL_ROOTS = tuple(f.name for f in dataclasses.fields(EvalSettings))


def split_eval_args(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` arguments into (eval settings, run-config overrides)."""
    mine, rest = [], []
    for a in overrides:
        key = a.split("=", 1)[0]
        root = key.split(".", 1)[0]
        # ``ema=both`` is ours; ``ema.enabled=...`` stays the run config's EMA section
        if root in EVAL_ROOTS and (root != "ema" or "." not in key):
            mine.append(a)
        else:
            rest.append(a)
    return mine, rest


def parse_eval_settings(args: list[str]) -> EvalSettings:
    """``protocol=knn knn.k=10 ema=false`` -> EvalSettings; a bad key or value names it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = [_list_arg(a) for a in args]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalSettings), OmegaConf.from_dotlist(args))
        s: EvalSettings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ProtocolError(f"eval setting '{key}': {str(e).splitlines()[0]}") from None
    s.ema = str(s.ema).lower()
    if s.ema not in ("true", "false", "both"):
        raise ProtocolError(f"ema={s.ema!r}: use true, false or both")
    for name in ([s.protocol] if s.protocol else []) + list(s.protocols):
        if name not in PROTOCOLS:
            raise ProtocolError(f"protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    if s.features.pool not in ("mean", "last", "cls"):
        raise ProtocolError(f"features.pool={s.features.pool!r}: use mean, last or cls")
    if s.knn.k < 1 or s.knn.temperature <= 0:
        raise ProtocolError(f"knn.k={s.knn.k} must be >= 1 and knn.temperature > 0")
    if s.raw.max_dim < 0:
        raise ProtocolError(f"raw.max_dim={s.raw.max_dim} must be >= 0 (0 = no limit)")
    return s


def _list_arg(a: str) -> str:
    """``protocols=knn,linear`` -> ``protocols=[knn,linear]`` (OmegaConf's list syntax)."""
    k, _, v = a.partition("=")
    if k == "protocols" and v and not v.startswith("["):
        return f"{k}=[{v}]"
    return a


# ------------------------------------------------------------------------------ weights
def weight_sets(path: str, ema: str) -> list[tuple[str, dict]]:
    """[(name, backbone state dict)] of a checkpoint for ``ema`` = true | false | both.

    Our training checkpoints hold raw weights (``state_dict``) and, when EMA ran,
    ``ema_state_dict``; ``ema=both`` evaluates both (only raw when there is no EMA), ``true``
    requires the EMA weights. A folder written by ``save_pretrained`` (or an official NEPA
    folder) holds one weight set, reported as "raw". ``path="random"`` is the baseline every
    SSL table needs: the config's model at its random init (seeded by the run's ``seed``),
    reported as "random", with no weights to load (None)."""
    if path == RANDOM:
        if ema == "true":
            raise ProtocolError("ema=true: ckpt=random has no EMA weights")
        return [(RANDOM, None)]
    p = Path(path)
    if p.is_dir():
        if ema == "true":
            raise ProtocolError(f"ema=true: {path} is a model folder with one weight set")
        from unipred.weights.pretrained import load_pretrained

        return [("raw", _backbone(load_pretrained(p).state_dict()))]
    from unipred.train.checkpoint import CheckpointError, read_checkpoint

    ckpt = read_checkpoint(p)
    raw = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    sets = []
    if ema in ("false", "both"):
        sets.append(("raw", _backbone(raw)))
    if ema in ("true", "both"):
        if ckpt.get("ema_state_dict") is not None:
            sets.append(("ema", _backbone(ckpt["ema_state_dict"])))
        elif ema == "true":
            raise CheckpointError(f"{path}: missing key 'ema_state_dict' (asked for ema=true)")
    return sets


def _backbone(sd: dict) -> dict:
    """The backbone's tensors: no classifier head, no pretraining objective's own parameters
    (a pixel-target or MLP head, a mask token: model.objective)."""
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "objective."))}


def load_backbone_weights(model: nn.Module, sd: dict, source: str) -> None:
    """Load every backbone tensor (strict: names and shapes); the model's head is left alone."""
    from unipred.train.checkpoint import check_state_dict

    want = _backbone(model.state_dict())
    check_state_dict(source, sd, want)
    model.load_state_dict(sd, strict=False)


# ----------------------------------------------------------------------------- features
@dataclass
class Features:
    """Frozen features of one split: what the protocols train and test on."""

    pooled: torch.Tensor  # (N, D) pooled final-norm output, fp32
    labels: torch.Tensor  # (N,) int64
    layers: torch.Tensor | None = None  # (L + 1, N, D) pooled block outputs, then final norm
    tokens: torch.Tensor | None = None  # (N, T, D) final-norm patch tokens, bf16
    valid: torch.Tensor | None = None  # (N, T) bool, when tokens are padded


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _labels(y) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.is_floating_point() and y.dim() == 2:  # soft targets
        y = y.argmax(dim=-1)
    return y.long().reshape(-1)


def _pad_cat(chunks: list[torch.Tensor], value) -> torch.Tensor:
    """Concatenate (B_i, T_i, ...) chunks along dim 0, padding T to the longest."""
    T = max(c.shape[1] for c in chunks)
    out = []
    for c in chunks:
        if c.shape[1] < T:
            pad = c.new_full((c.shape[0], T - c.shape[1], *c.shape[2:]), value)
            c = torch.cat([c, pad], dim=1)
        out.append(c)
    return torch.cat(out)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches,
    *,
    inputs=lambda b: b[0],
    pool: str = "mean",
    layers: bool = False,
    tokens: bool = False,
    device: torch.device | str = "cpu",
    autocast: torch.dtype | None = None,
    max_samples: int = 0,
    block: int | None = None,
) -> Features:
    """One pass of the frozen backbone (eval mode, no grad) over labelled batches. ``pooled``
    is the final norm's output, or that of block ``block`` (negative: from the top)."""
    model.eval()
    device = torch.device(device)
    n_prefix = int(getattr(model, "n_prefix", 0))
    n_blocks = len(model.predictor.blocks)
    if block is not None and not -n_blocks <= block < n_blocks:
        raise ProtocolError(f"features.block={block}: the backbone has {n_blocks} blocks")
    want = tuple(range(n_blocks)) if layers else ((block % n_blocks,) if block is not None else ())
    pooled, labels, per_layer, toks, valid = [], [], [], [], []
    n = 0
    for batch in batches:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ProtocolError(
                "the data carry no labels (batches are not (input, label, ...)): give a "
                "classification config (e.g. a *_probe / *_classify / *_finetune recipe)"
            )
        x = _to(inputs(batch), device)
        y = _labels(batch[1])
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model.forward_features(x, layers=want)
        v = out.valid
        src = out.hidden if block is None else out.layers[want.index(block % n_blocks)]
        pooled.append(pool_tokens(src, n_prefix, v, pool).float().cpu())
        if layers:
            hs = [pool_tokens(h, n_prefix, v, pool) for h in (*out.layers, out.hidden)]
            per_layer.append(torch.stack(hs).float().cpu())
        if tokens:
            toks.append(out.hidden[:, n_prefix:].to(torch.bfloat16).cpu())
            vv = v[:, n_prefix:] if v is not None else None
            valid.append(
                vv.cpu()
                if vv is not None
                else torch.ones(out.hidden.shape[0], toks[-1].shape[1], dtype=torch.bool)
            )
        labels.append(y)
        n += y.shape[0]
        if max_samples and n >= max_samples:
            break
    if not labels:
        raise ProtocolError("the data set yielded no batches")
    f = Features(torch.cat(pooled), torch.cat(labels))
    if layers:
        f.layers = torch.cat(per_layer, dim=1)
    if tokens:
        f.tokens, f.valid = _pad_cat(toks, 0.0), _pad_cat(valid, False)
        if bool(f.valid.all()):
            f.valid = None
    if max_samples:
        f = _head(f, max_samples)
    return f


def frozen_features(model: nn.Module, x, pool: str | None = None) -> torch.Tensor:
    """Pooled features (B, D) in fp32 of the frozen backbone: tokenizer and predictor in eval
    mode (no drop path, no RoPE coordinate augmentation), no grad. ``pool`` defaults to the
    model head's pooling (the probe's), else the mean over the patch tokens."""
    model.tokenizer.eval()
    model.predictor.eval()
    pool = pool or getattr(getattr(model, "head", None), "pool", None) or "mean"
    with torch.no_grad():
        out = model.forward_features(x)
        return pool_tokens(out.hidden, int(getattr(model, "n_prefix", 0)), out.valid, pool).float()


class FeatureCache:
    """Frozen features per sample index, each computed once: a linear probe trained inside
    ``unipred fit`` (``data.mode=probe``) reads its training features from here after the
    first epoch. Lives on the features' device; grows to the largest index seen."""

    def __init__(self):
        self.feats: torch.Tensor | None = None
        self.have: torch.Tensor | None = None

    def get(self, idx: torch.Tensor, compute) -> torch.Tensor:
        """The features of the samples ``idx`` (B,), calling ``compute()`` -> (B, D) when any
        of them is missing."""
        idx = idx.long()
        if self.have is not None and int(idx.max()) < len(self.have):
            idx = idx.to(self.have.device)
            if bool(self.have[idx].all()):
                return self.feats[idx]
        f = compute()
        need = int(idx.max()) + 1
        if self.feats is None or need > len(self.feats):
            n = max(need, 2 * len(self.feats) if self.feats is not None else need)
            feats = f.new_zeros(n, f.shape[1])
            have = torch.zeros(n, dtype=torch.bool, device=f.device)
            if self.feats is not None:
                feats[: len(self.feats)], have[: len(self.have)] = self.feats, self.have
            self.feats, self.have = feats, have
        idx = idx.to(f.device)
        self.feats[idx], self.have[idx] = f, True
        return f


def _head(f: Features, n: int) -> Features:
    return Features(
        f.pooled[:n],
        f.labels[:n],
        None if f.layers is None else f.layers[:, :n],
        None if f.tokens is None else f.tokens[:n],
        None if f.valid is None else f.valid[:n],
    )


# ----------------------------------------------------------------------------- protocols
def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, scores.shape[-1])
    hit = (scores.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    return float(hit.float().mean())


@torch.no_grad()
def knn_classify(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted kNN: class scores (N_test, C) from the k most cosine-similar training
    features, each voting exp(similarity / temperature) for its label."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i : i + chunk] @ train.T  # (b, N_train)
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out)


class LinearProbe(LinearProbeHead):
    """MAE's probe, the model's ``head: probe`` (BatchNorm1d without affine, then a linear
    layer initialised N(0, 0.01)), applied to features that are already pooled."""

    def forward(self, x):
        return self.classifier(self.bn(x))


class LayerProbes(nn.Module):
    """One LinearProbe per layer, trained together: (L, B, D) -> (L, B, C)."""

    def __init__(self, n_layers: int, dim: int, num_classes: int):
        super().__init__()
        self.probes = nn.ModuleList(LinearProbe(dim, num_classes) for _ in range(n_layers))

    def forward(self, x):
        return torch.stack([p(x[i]) for i, p in enumerate(self.probes)])


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive classifier: a learned query cross-attends to the (normed) tokens,
    the query is updated residually (attention, then an MLP on its norm) and a linear layer
    reads it. Padded tokens (valid False) are not attended to."""

    def __init__(self, dim: int, num_classes: int, heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ProtocolError(f"attentive.heads={heads} does not divide the width {dim}")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.fc = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.query, std=0.02)

    def pool(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = tokens.shape
        H, d = self.heads, D // self.heads
        x = self.norm1(tokens)
        query = self.query.expand(B, -1, -1)
        q = self.q(query).view(B, 1, H, d).transpose(1, 2)  # (B, H, 1, d)
        k, v = self.kv(x).view(B, N, 2, H, d).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
        mask = None if valid is None else valid[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        query = query + self.proj(a.transpose(1, 2).reshape(B, 1, D))
        query = query + self.mlp(self.norm2(query))
        return query[:, 0]

    def forward(self, tokens, valid=None):
        return self.fc(self.pool(tokens, valid))


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_probe(
    probe: nn.Module,
    train_inputs: tuple,
    labels: torch.Tensor,
    s: ProbeSettings | AttentiveSettings,
    *,
    seed: int = 0,
    device="cpu",
    batch_dim: tuple[int, ...] | None = None,
    loss_fn=None,
) -> nn.Module:
    """Train ``probe(*inputs)`` with AdamW (cosine lr) on cached inputs; ``batch_dim`` gives
    the batch axis of each input (default 0); inputs that are None pass through."""
    probe.to(device).train()
    dims = batch_dim or (0,) * len(train_inputs)
    n = labels.shape[0]
    opt = torch.optim.AdamW(probe.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = max(1, math.ceil(n / s.batch))
    total = s.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    loss_fn = loss_fn or F.cross_entropy
    step = 0
    for _ in range(s.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, s.batch):
            idx = perm[i : i + s.batch]
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            xs = [
                None if x is None else x.index_select(d, idx).to(device).float()
                if x.is_floating_point() else x.index_select(d, idx).to(device)
                for x, d in zip(train_inputs, dims)
            ]  # fmt: skip
            for gr in opt.param_groups:
                gr["lr"] = s.lr * _cosine(step, total)
            loss = loss_fn(probe(*xs), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def predict(probe: nn.Module, inputs: tuple, batch: int = 4096, device="cpu", batch_dim=None):
    dims = batch_dim or (0,) * len(inputs)
    n = next(x for x in inputs if x is not None).shape[dims[0]]
    outs = []
    for i in range(0, n, batch):
        xs = [
            None if x is None else x.narrow(d, i, min(batch, n - i)).to(device)
            for x, d in zip(inputs, dims)
        ]
        xs = [x.float() if x is not None and x.is_floating_point() else x for x in xs]
        outs.append(probe(*xs).float().cpu())
    return torch.cat(outs, dim=-2)


def _scores(top1: float, top5: float, **details) -> dict:
    return {"top1": top1, "top5": top5, **details}


def run_knn(train: Features, val: Features, num_classes: int, s: KNNSettings) -> dict:
    scores = knn_classify(train.pooled, train.labels, val.pooled, num_classes, s.k, s.temperature)
    return _scores(
        topk_accuracy(scores, val.labels, 1),
        topk_accuracy(scores, val.labels, 5),
        k=min(s.k, train.pooled.shape[0]),
        temperature=s.temperature,
    )


def run_linear(train: Features, val: Features, num_classes: int, s: ProbeSettings, seed=0,
               device="cpu") -> dict:  # fmt: skip
    torch.manual_seed(seed)
    probe = LinearProbe(train.pooled.shape[1], num_classes)
    train_probe(probe, (train.pooled,), train.labels, s, seed=seed, device=device)
    scores = predict(probe, (val.pooled,), device=device)
    return _scores(topk_accuracy(scores, val.labels), topk_accuracy(scores, val.labels, 5),
                   epochs=s.epochs, lr=s.lr)  # fmt: skip


def run_attentive(train: Features, val: Features, num_classes: int, s: AttentiveSettings,
                  heads: int, seed=0, device="cpu") -> dict:  # fmt: skip
    if train.tokens is None or val.tokens is None:
        raise ProtocolError("the attentive probe needs token features (tokens=True)")
    torch.manual_seed(seed)
    h = s.heads or heads
    probe = AttentiveProbe(train.tokens.shape[-1], num_classes, h, s.mlp_ratio)
    train_probe(probe, (train.tokens, train.valid), train.labels, s, seed=seed, device=device)
    scores = predict(probe, (val.tokens, val.valid), batch=1024, device=device)
    return _scores(topk_accuracy(scores, val.labels), topk_accuracy(scores, val.labels, 5),
                   epochs=s.epochs, lr=s.lr, heads=h)  # fmt: skip


def run_layers(train: Features, val: Features, num_classes: int, s: ProbeSettings, seed=0,
               device="cpu") -> dict:  # fmt: skip
    """A probe per block output (and the final norm), trained together; the best one wins."""
    if train.layers is None or val.layers is None:
        raise ProtocolError("the per-layer sweep needs per-layer features (layers=True)")
    torch.manual_seed(seed)
    L, _, D = train.layers.shape
    probes = LayerProbes(L, D, num_classes)

    def loss_fn(logits, y):  # (L, B, C): the sum of the per-layer losses
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(L)) * L

    train_probe(probes, (train.layers,), train.labels, s, seed=seed, device=device,
                batch_dim=(1,), loss_fn=loss_fn)  # fmt: skip
    scores = predict(probes, (val.layers,), device=device, batch_dim=(1,))  # (L, N, C)
    names = [f"block {i}" for i in range(L - 1)] + ["final norm"]
    per_layer = {
        name: {
            "top1": topk_accuracy(scores[i], val.labels),
            "top5": topk_accuracy(scores[i], val.labels, 5),
        }
        for i, name in enumerate(names)
    }
    best = max(per_layer, key=lambda k: per_layer[k]["top1"])
    return _scores(per_layer[best]["top1"], per_layer[best]["top5"], best_layer=best,
                   per_layer=per_layer, epochs=s.epochs, lr=s.lr)  # fmt: skip


# ------------------------------------------------------------------------ orchestration
def _device(cfg) -> torch.device:
    acc = cfg.trainer.accelerator
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ProtocolError("trainer.accelerator=gpu but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast(cfg) -> torch.dtype | None:
    p = cfg.trainer.precision
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(p)


def _loader(task, split: str, s: FeatureSettings, workers: int, augment: bool = False):
    if augment:
        ds, collate = task.build_dataset(split), task.collate_fn(split)
    else:
        ds, collate = task.feature_dataset(split)
    if ds is None:
        key = "data.root" if split == "train" else "data.val_root (or the task's val split)"
        raise ProtocolError(
            f"task {task.cfg.task!r} has no {split} split here: set {key}; the frozen "
            "protocols need labelled train and val data"
        )
    nw = workers if s.num_workers < 0 else s.num_workers
    return torch.utils.data.DataLoader(
        ds, batch_size=s.batch, shuffle=False, num_workers=nw, collate_fn=collate
    )


def _num_classes(task, *labels: torch.Tensor) -> int:
    n = task.num_classes() if hasattr(task, "num_classes") else 0
    seen = int(max(int(y.max()) for y in labels)) + 1
    if n and seen > n:
        raise ProtocolError(f"labels go up to {seen - 1} but the task has {n} classes")
    return n or seen


def run_protocols(cfg, settings: EvalSettings, protocols, log=print) -> dict:
    """Run frozen protocols on ``cfg.ckpt`` for the requested weight sets.

    -> {"rows": [{protocol, weights, top1, top5, seconds, ...}], "meta": {...}}.
    The backbone is the CONFIG's model (``task.build_model()``: its attention mode, e.g.
    causal as pretrained, is the config's), with every backbone tensor from the checkpoint."""
    from unipred.base.registry import TASKS

    protocols = list(protocols)
    bad = [p for p in protocols if p not in FROZEN]
    if bad:
        raise ProtocolError(f"not a frozen-feature protocol: {bad}; use {', '.join(FROZEN)}")
    if not cfg.ckpt:
        raise ProtocolError("give ckpt=PATH (a checkpoint or a save_pretrained folder)")
    need_classification(cfg, f"protocol={protocols[0]}" if len(protocols) == 1 else "the protocols")
    task = TASKS.get(cfg.task)(cfg)
    torch.manual_seed(cfg.seed)  # the random-init baseline is the same model every time
    model = task.build_model()
    device, autocast = _device(cfg), _autocast(cfg)
    fs = settings.features
    workers = int(getattr(cfg.data, "num_workers", 0))
    rows, meta = [], {"feature_seconds": {}}
    want_layers, want_tokens = "layers" in protocols, "attentive" in protocols
    for name, sd in weight_sets(cfg.ckpt, settings.ema):
        if sd is not None:
            load_backbone_weights(model, sd, cfg.ckpt)
        model.to(device)
        t0 = time.perf_counter()
        feats = {}
        for split, limit in (("train", fs.max_train), ("val", fs.max_val)):
            feats[split] = extract_features(
                model, _loader(task, split, fs, workers), inputs=task.inputs, pool=fs.pool,
                layers=want_layers, tokens=want_tokens, device=device, autocast=autocast,
                max_samples=limit, block=fs.block,
            )  # fmt: skip
        meta["feature_seconds"][name] = round(time.perf_counter() - t0, 2)
        tr, va = feats["train"], feats["val"]
        meta.update(train_samples=len(tr.labels), val_samples=len(va.labels))
        C = _num_classes(task, tr.labels, va.labels)
        where = "final norm" if fs.block is None else f"block {fs.block}"
        log(f"[{name}] features ({where}, {fs.pool} pooling): {len(tr.labels)} train / "
            f"{len(va.labels)} val samples, width {tr.pooled.shape[1]}, "
            f"{meta['feature_seconds'][name]} s")  # fmt: skip
        for proto in protocols:
            t0 = time.perf_counter()
            if proto == "knn":
                r = run_knn(tr, va, C, settings.knn)
            elif proto == "linear" and settings.linear.augment:
                r = run_linear_augmented(model, task, va, C, settings, device, autocast)
            elif proto == "linear":
                r = run_linear(tr, va, C, settings.linear, settings.seed, device)
            elif proto == "attentive":
                heads = model.predictor.cfg.heads if hasattr(model, "predictor") else 8
                r = run_attentive(tr, va, C, settings.attentive, heads, settings.seed, device)
            else:
                r = run_layers(tr, va, C, settings.layers, settings.seed, device)
            r = {"protocol": proto, "weights": name, **r,
                 "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
            rows.append(r)
            log(format_row(r))
            if proto == "layers":
                for layer, acc in r["per_layer"].items():
                    mark = "  <- best" if layer == r["best_layer"] else ""
                    log(f"    {layer:<12} top-1 {100 * acc['top1']:6.2f} %{mark}")
        del feats, tr, va
    return {"rows": rows, "meta": meta}


def run_linear_augmented(model, task, val: Features, C, settings: EvalSettings, device,
                         autocast) -> dict:  # fmt: skip
    """Linear probe on features recomputed every epoch through the task's training pipeline
    (its augmentation), backbone frozen in eval mode."""
    s, fs = settings.linear, settings.features
    torch.manual_seed(settings.seed)
    probe = LinearProbe(val.pooled.shape[1], C).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    loader = _loader(task, "train", dataclasses.replace(fs, batch=s.batch),
                     int(getattr(task.cfg.data, "num_workers", 0)), augment=True)  # fmt: skip
    total = s.epochs * max(1, len(loader)) if hasattr(loader, "__len__") else s.epochs
    step = 0
    for _ in range(s.epochs):
        f = extract_features(model, loader, inputs=task.inputs, pool=fs.pool, device=device,
                             autocast=autocast, block=fs.block)  # fmt: skip
        probe.train()
        for i in range(0, len(f.labels), s.batch):
            x, y = f.pooled[i : i + s.batch].to(device), f.labels[i : i + s.batch].to(device)
            if len(y) < 2:
                continue
            for gr in opt.param_groups:
                gr["lr"] = s.lr * _cosine(step, total)
            loss = F.cross_entropy(probe(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    scores = predict(probe, (val.pooled,), device=device)
    return _scores(topk_accuracy(scores, val.labels), topk_accuracy(scores, val.labels, 5),
                   epochs=s.epochs, lr=s.lr, augment=True)  # fmt: skip


def need_classification(cfg, what: str) -> None:
    """The protocols score class labels: a task of another objective is one clear error."""
    from unipred.base.registry import TASKS
    from unipred.task import ClassifyTask

    if not issubclass(TASKS.get(cfg.task), ClassifyTask):
        raise ProtocolError(
            f"{what} scores class labels, but task {cfg.task!r} is not a classification task; "
            "give a *_classify task (a segmentation model is scored by plain `unipred eval`)"
        )


def run_finetune(cfg, settings: EvalSettings, log=print) -> dict:
    """Fine-tune with the CONFIG's recipe from the checkpoint's backbone (raw and/or EMA);
    report the final validation accuracy of each run."""
    from unipred.train.engine import fit

    need_classification(cfg, "protocol=finetune")
    if not cfg.ckpt:
        raise ProtocolError("protocol=finetune needs ckpt=PATH (a pretraining checkpoint)")
    names = [n for n, _ in weight_sets(cfg.ckpt, settings.ema)]
    rows = []
    for name in names:
        run = dataclasses.replace(cfg)
        init = "" if name == RANDOM else f"pretrain:{cfg.ckpt}" + (":ema" if name == "ema" else "")
        run.model = dataclasses.replace(cfg.model, init=init)  # random: from scratch
        run.run_dir = str(Path(cfg.run_dir) / f"finetune_{name}")
        run.ckpt = ""
        t0 = time.perf_counter()
        trainer = fit(run)
        if "val/acc1" not in trainer.callback_metrics:  # stopped by max_steps before validating
            trainer.validate(trainer.lightning_module, verbose=False)
        m = trainer.callback_metrics
        r = {"protocol": "finetune", "weights": name,
             "top1": float(m.get("val/acc1", float("nan"))),
             "top5": float(m.get("val/acc5", float("nan"))),
             "run_dir": run.run_dir, "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        rows.append(r)
        log(format_row(r))
    return {"rows": rows, "meta": {}}


# ------------------------------------------------------------------------------ results
def _pct(v) -> str:
    """A fraction as a percentage; "-" where the row has none (a baseline's top-5)."""
    return "-" if v is None else f"{100 * v:.2f} %"


def format_row(r: dict) -> str:
    extra = ""
    if r["protocol"] == "layers":
        extra = f"  best: {r['best_layer']}"
    elif r["protocol"] == "knn":
        extra = f"  k={r['k']} T={r['temperature']}"
    return (f"{r['protocol']:<10} {r['weights']:<6} top-1 {_pct(r['top1']):>8}  "
            f"top-5 {_pct(r['top5']):>8}  ({r['seconds']:.1f} s){extra}")  # fmt: skip


def row_details(r: dict) -> str:
    """The "details" cell of a results row."""
    if r["protocol"] == "knn":
        return f"k={r['k']}, T={r['temperature']}"
    if r["protocol"] == "layers":
        return f"best: {r['best_layer']}"
    if r["protocol"] in ("linear", "attentive"):
        dim = f", {r['dim']} raw values" if "dim" in r else ""
        return f"{r['epochs']} epochs, lr {r['lr']}{dim}"
    return r.get("run_dir", "")


def results_markdown(results: dict) -> str:
    m = results.get("meta", {})
    lines = [
        f"# Evaluation of `{m.get('checkpoint', '?')}`",
        "",
        f"Config `{m.get('config', '?')}` (task `{m.get('task', '?')}`); "
        f"{m.get('train_samples', '?')} training / {m.get('val_samples', '?')} validation "
        "samples; frozen backbone in eval mode.",
        "",
        "| protocol | weights | top-1 | top-5 | details | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        det = row_details(r)
        lines.append(f"| {r['protocol']} | {r['weights']} | {_pct(r['top1'])} | "
                     f"{_pct(r['top5'])} | {det} | {r['seconds']:.1f} |")  # fmt: skip
    for r in results["rows"]:
        if r["protocol"] == "layers":
            lines += ["", f"Per-layer probe ({r['weights']} weights):", "",
                      "| layer | top-1 |", "|---|---|"]  # fmt: skip
            for layer, acc in r["per_layer"].items():
                star = " (best)" if layer == r["best_layer"] else ""
                lines.append(f"| {layer}{star} | {100 * acc['top1']:.2f} % |")
    return "\n".join(lines) + "\n"


def suite_folder(ckpt: str, out: str = "") -> Path:
    """Where ``evaluate-suite`` writes: ``out``, else ``<run folder of the checkpoint>/eval``."""
    if out:
        return Path(out)
    if ckpt == RANDOM:
        raise ProtocolError("ckpt=random has no run folder: give out=DIR for the results")
    p = Path(ckpt)
    if p.is_dir():
        return p / "eval"
    run = p.parent.parent if p.parent.name in ("checkpoints", "best") else p.parent
    return run / "eval"


def write_results(results: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / "results.md", folder / "results.json"
    md.write_text(results_markdown(results))
    js.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return md, js


def evaluate_suite(cfg, settings: EvalSettings, config_name: str = "", log=print) -> dict:
    """Every requested protocol on ``cfg.ckpt``; results.md / results.json in the run folder."""
    from unipred.protocols.baselines import run_with_baselines

    t0 = time.perf_counter()
    results = run_with_baselines(cfg, settings, settings.protocols, log)
    results["meta"].update(
        checkpoint=str(cfg.ckpt), config=config_name, task=cfg.task,
        settings=dataclasses.asdict(settings), total_seconds=round(time.perf_counter() - t0, 1),
    )  # fmt: skip
    md, js = write_results(results, suite_folder(cfg.ckpt, settings.out))
    log(f"wrote {md} and {js}")
    return results


def settings_dict(s: EvalSettings) -> dict[str, Any]:
    return dataclasses.asdict(s)


# ------------------------------------------------------------------------ demo tables
LABELS = {"knn": "kNN (k=20, T=0.07)", "linear": "linear probe", "attentive": "attentive probe",
          "layers": "per-layer probe, best layer"}  # fmt: skip


def frozen_eval(config, overrides: list[str], ckpt: str, protocols=FROZEN, settings=(),
                log=print) -> list[dict]:  # fmt: skip
    """The frozen protocols on one checkpoint (or ``"random"``) of ``config`` with ``overrides``:
    the rows of the demos' tables (raw weights only). ``settings`` are eval keys such as
    ``"linear.epochs=50"``."""
    from unipred.train.config import load_config

    s = parse_eval_settings([*settings, "ema=false"])
    cfg = load_config(config, [*overrides, f"ckpt={ckpt}"])
    return run_protocols(cfg, s, protocols, log)["rows"]


def comparison_markdown(columns: dict[str, list[dict]]) -> str:
    """One row per protocol, one column per backbone (e.g. NEPA vs random init): top-1, with
    the best layer named for the per-layer sweep."""
    names = list(columns)
    protos = [r["protocol"] for r in columns[names[0]]]
    lines = ["| protocol | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p in protos:
        cells = []
        for n in names:
            r = next(r for r in columns[n] if r["protocol"] == p)
            best = f" ({r['best_layer']})" if p == "layers" else ""
            cells.append(f"{100 * r['top1']:.1f} %{best}")
        lines.append(f"| {LABELS.get(p, p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
