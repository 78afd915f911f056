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
