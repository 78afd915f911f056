"""The next-embedding prediction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_embedding_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative cosine between the output at t and the (detached) input token at t+1.

    pred:   (B, T, D) predictor outputs after the final norm.
    target: (B, T, D) raw input tokens (prefix + tokenizer output, before any norm).
    valid:  optional (B, T) bool; a pair counts only when both t and t+1 are real tokens.
    Returns a scalar in [-1, 1]; -1 is a perfect prediction. Computed in float32.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            f"pred and target must both be (B, T, D); got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p = pred[:, :-1].float()
    t = target[:, 1:].detach().float()  # stop-gradient: the target side never learns from the loss
    cos = F.cosine_similarity(p, t, dim=-1)  # (B, T-1)
    if valid is None:
        return -cos.mean()
    if valid.shape != pred.shape[:2]:
        raise ValueError(
            f"valid must be (B, T) = {tuple(pred.shape[:2])}, got {tuple(valid.shape)}"
        )
    pair = (valid[:, :-1] & valid[:, 1:]).float()
    return -(cos * pair).sum() / pair.sum().clamp_min(1.0)


LOSSES = ("cosine", "mse", "smooth_l1", "infonce", "infonce_batch", "infonce_position")


def pair_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    pair: torch.Tensor | None = None,
    kind: str = "cosine",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Mean loss between aligned predictions and targets (B, L, P) over pairs (B, L) | None.

    cosine: negative cosine (the release; same operations as ``next_embedding_loss``);
    mse / smooth_l1: per-pair mean over the P values; infonce: cross-entropy of picking the
    pair's own target among all (valid) targets of the same sample, cosine / temperature;
    infonce_batch: the same among all (valid) targets of the whole batch, so the other samples'
    tokens are negatives too and different samples are pushed apart (a (B L)^2 matrix: sized
    for small models and batches, such as the audio recipe's 64 clips of 25 tokens);
    infonce_position: the same among the targets at the same position of every sample of the
    batch (L matrices of B x B: the negatives are what other samples hold where this one's
    target is, never other positions; grows with B^2 L, not (B L)^2).
    The caller aligns: pred[:, i] predicts target[:, i]. Computed in float32.
    """
    p, t = pred.float(), target.float()
    if kind == "cosine":
        per = -F.cosine_similarity(p, t, dim=-1)
    elif kind == "mse":
        per = (p - t).pow(2).mean(dim=-1)
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(p, t, reduction="none").mean(dim=-1)
    elif kind == "infonce":
        logits = F.normalize(p, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2) / temperature
        if pair is not None:  # padded targets are no candidates
            logits = logits.masked_fill(~pair[:, None, :], float("-inf"))
        per = logits.logsumexp(dim=-1) - logits.diagonal(dim1=1, dim2=2)
        if pair is not None:  # a padded row's own target is masked too: -inf - -inf = nan
            per = per.masked_fill(~pair, 0.0)
    elif kind == "infonce_batch":
        B, L, P = p.shape
        pf = F.normalize(p, dim=-1).reshape(B * L, P)
        tf = F.normalize(t, dim=-1).reshape(B * L, P)
        logits = pf @ tf.T / temperature
        if pair is not None:
            logits = logits.masked_fill(~pair.reshape(1, B * L), float("-inf"))
        per = (logits.logsumexp(dim=-1) - logits.diagonal()).reshape(B, L)
        if pair is not None:
            per = per.masked_fill(~pair, 0.0)
    elif kind == "infonce_position":
        pf = F.normalize(p, dim=-1).transpose(0, 1)  # (L, B, P)
        tf = F.normalize(t, dim=-1).transpose(0, 1)
        logits = pf @ tf.transpose(1, 2) / temperature  # (L, B, B): position l, sample b vs b'
        if pair is not None:  # padded targets are no candidates
            logits = logits.masked_fill(~pair.T[:, None, :], float("-inf"))
        per = (logits.logsumexp(dim=-1) - logits.diagonal(dim1=1, dim2=2)).T  # (B, L)
        if pair is not None:
            per = per.masked_fill(~pair, 0.0)
    else:
        raise ValueError(f"unknown loss {kind!r}; use one of {', '.join(LOSSES)}")
    if pair is None:
        return per.mean()
    w = pair.float()
    return (per * w).sum() / w.sum().clamp_min(1.0)
