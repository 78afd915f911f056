"""The frozen backbone and its features: which weight sets a checkpoint holds (raw, EMA, the
random-init baseline), loading them into the config's model, and one feature pass over a split
(pooled, per layer, per token) that every frozen protocol shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unipred.nn.heads import pool_tokens
from unipred.protocols.settings import RANDOM, ProtocolError, pool_parts


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
        from unipred.train.formats import load_model_folder

        return [("raw", _backbone(load_model_folder(p).state_dict()))]
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


# ----------------------------------------------------------------------------- pooling
NORMS = ("none", "sample", "feature")


def pool_words(pool: str, cells: int) -> str:
    """``features.pool`` in words, for logs and tables."""
    return " + ".join(f"grid {cells} per axis" if p == "grid" else p for p in pool_parts(pool))


def normalise_tokens(x: torch.Tensor, valid, norm: str) -> torch.Tensor:
    """Per-sample standardisation of (B, N, D) tokens over each sample's own real tokens
    (``valid`` (B, N) or None), before any pooling: ``sample`` one mean and one std per sample
    over its real tokens and all D features (a level shift of the whole sample, such as a
    louder voice, cancels); ``feature`` each feature's own mean and std per sample (cepstral
    mean and variance normalisation when the tokens are log-mel patches: a per-sample offset
    of any feature, such as a voice's average spectrum, cancels; the mean over the tokens then
    is zero, so it is read with a grid or the last token). Only the sample itself enters its
    statistics: nothing is estimated on another sample or split. ``none`` returns ``x``."""
    if norm == "none":
        return x
    if norm not in NORMS:
        raise ProtocolError(f"features.norm={norm!r}: use {', '.join(NORMS)}")
    x = x.float()
    B, N, D = x.shape
    w = torch.ones(B, N, device=x.device) if valid is None else valid.to(x.device).float()
    w = w.unsqueeze(-1)
    dims = (1, 2) if norm == "sample" else (1,)
    count = (w.sum(1, keepdim=True) * (D if norm == "sample" else 1)).clamp_min(1.0)
    mean = (x * w).sum(dims, keepdim=True) / count
    var = ((x - mean) ** 2 * w).sum(dims, keepdim=True) / count
    return (x - mean) / var.sqrt().clamp_min(1e-6)


def grid_pool(hidden, n_prefix: int, valid, coords, cells: int) -> torch.Tensor:
    """(B, T, D) -> (B, cells**k * D): the patch tokens averaged per cell of a grid with
    ``cells`` equal bins along each of the k axes of the tokens' coordinates (``coords``
    (N, k) or (B, N, k), the positions the tokenizer gives RoPE: (y, x) for images, (t, y, x)
    for video, time and frequency for audio, position for text), the cell means concatenated
    in a fixed order. Where a token sits survives, which a mean over all tokens throws away:
    the classic linear-probe read-out of spatial feature maps, and the layout the raw-input
    baseline (flattened patches) keeps. Bins span each sample's own coordinate range (its real
    tokens only), so a variable-length sample is cut into ``cells`` parts of its own length;
    a cell no token falls in gives zeros. ``cells`` at the token grid's own resolution keeps
    every token (the features of all tokens, concatenated)."""
    x = hidden[:, n_prefix:].float()
    B, N, D = x.shape
    c = coords.to(x.device).float()
    c = c.expand(B, *c.shape[-2:]) if c.dim() == 2 else c
    if c.shape[1] != N:
        raise ProtocolError(f"features.pool=grid: {c.shape[1]} coordinates for {N} tokens")
    v = (
        torch.ones(B, N, dtype=torch.bool, device=x.device)
        if valid is None
        else valid[:, n_prefix:]
    )
    vv = v.unsqueeze(-1)
    big = torch.finfo(c.dtype).max
    lo = torch.where(vv, c, big).amin(dim=1, keepdim=True)
    hi = torch.where(vv, c, -big).amax(dim=1, keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    # the centre of a token on a bin edge (e.g. the middle row of 5 for 2 cells) goes up
    b = ((c - lo) / span * cells).floor().clamp(0, cells - 1).long()  # (B, N, k)
    idx = torch.zeros(B, N, dtype=torch.long, device=x.device)
    for axis in range(b.shape[-1]):
        idx = idx * cells + b[..., axis]
    n_cells = cells ** b.shape[-1]
    w = F.one_hot(idx, n_cells).to(x.dtype) * v.unsqueeze(-1).to(x.dtype)  # (B, N, C)
    sums = torch.einsum("bnd,bnc->bcd", x, w)
    return (sums / w.sum(dim=1).clamp_min(1.0).unsqueeze(-1)).reshape(B, n_cells * D)


def pool_features(out, src, n_prefix: int, pool: str, cells: int = 2,
                  norm: str = "none") -> torch.Tensor:  # fmt: skip
    """Pool one (B, T, D) output ``src`` of a ``forward_features`` result ``out``: ``grid``
    (``grid_pool`` on the tokens' coordinates) or a pooling of ``unipred.nn.heads.pool_tokens``;
    ``norm`` standardises the patch tokens per sample first (``normalise_tokens``); several
    poolings joined by '+' give their results concatenated, in that order."""
    if norm != "none" and pool != "cls":  # once, whatever the poolings (cls reads the prefix)
        v = None if out.valid is None else out.valid[:, n_prefix:]
        src = torch.cat(
            [src[:, :n_prefix].float(), normalise_tokens(src[:, n_prefix:], v, norm)], 1
        )
    if "+" in pool:
        return torch.cat([pool_features(out, src, n_prefix, p, cells)
                          for p in pool_parts(pool)], -1)  # fmt: skip
    if pool == "grid":
        coords = getattr(out, "coords", None)
        if coords is None:
            raise ProtocolError(
                "features.pool=grid: the model's forward_features gives no token coordinates"
            )
        return grid_pool(src, n_prefix, out.valid, coords, cells)
    return pool_tokens(src, n_prefix, out.valid, pool)


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


def cls_unusable(model: nn.Module) -> str | None:
    """Why the cls token of ``model`` carries nothing about the input, or None when it does:
    no prefix token, or a causal backbone, where the first token attends only to itself (its
    output is the same for every input)."""
    if int(getattr(model, "n_prefix", 0)) < 1:
        return "the backbone has no cls token"
    pred = getattr(model, "predictor", None)
    if bool(getattr(getattr(pred, "cfg", None), "causal", False)):
        return (
            "the cls token comes first in this causal backbone and attends only to itself, so "
            "its output is the same for every input (a bidirectional backbone, e.g. a fine-tuned "
            "one, has a usable cls token)"
        )
    return None


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
    cells: int = 2,
    concat: tuple[int, ...] = (),
    norm: str = "none",
) -> Features:
    """One pass of the frozen backbone (eval mode, no grad) over labelled batches. ``pooled``
    is the final norm's output, or that of block ``block`` (negative: from the top), pooled
    by ``pool`` (``grid``: ``cells`` bins per coordinate axis, see ``grid_pool``), then the
    outputs of the blocks in ``concat``, pooled alike, appended to it; ``norm`` standardises
    each sample's tokens before pooling (``normalise_tokens``)."""
    model.eval()
    device = torch.device(device)
    n_prefix = int(getattr(model, "n_prefix", 0))
    if "cls" in pool_parts(pool) and (why := cls_unusable(model)):
        raise ProtocolError(f"features.pool=cls: {why}; use mean, grid or last")
    n_blocks = len(model.predictor.blocks)
    for key, b in [("block", block)] * (block is not None) + [("concat", b) for b in concat]:
        if not -n_blocks <= b < n_blocks:
            raise ProtocolError(f"features.{key}={b}: the backbone has {n_blocks} blocks")
    picked = ([block] if block is not None else []) + list(concat)
    want = tuple(range(n_blocks)) if layers else tuple(sorted({b % n_blocks for b in picked}))
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
        parts = [src] + [out.layers[want.index(b % n_blocks)] for b in concat]
        pooled.append(
            torch.cat([pool_features(out, h, n_prefix, pool, cells, norm) for h in parts], -1)
            .float()
            .cpu()
        )
        if layers:
            hs = [pool_features(out, h, n_prefix, pool, cells, norm)
                  for h in (*out.layers, out.hidden)]  # fmt: skip
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


def _head(f: Features, n: int) -> Features:
    return Features(
        f.pooled[:n],
        f.labels[:n],
        None if f.layers is None else f.layers[:, :n],
        None if f.tokens is None else f.tokens[:n],
        None if f.valid is None else f.valid[:n],
    )
