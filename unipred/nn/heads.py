"""Shared downstream heads over predictor outputs (B, T, D)."""

from __future__ import annotations

import torch
from torch import nn


def pool_tokens(hidden: torch.Tensor, n_prefix: int, valid: torch.Tensor | None, pool: str):
    """Pool (B, T, D) over the non-prefix tokens: 'mean' over real tokens, or the 'last' one."""
    x = hidden[:, n_prefix:]
    v = None if valid is None else valid[:, n_prefix:]
    if pool == "mean":
        if v is None:
            return x.mean(dim=1)
        w = v.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    if pool == "last":
        if v is None:
            return x[:, -1]
        idx = v.long().cumsum(dim=1).argmax(dim=1)  # index of the last real token
        return x[torch.arange(x.shape[0], device=x.device), idx]
    if pool == "cls":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {pool!r}; use 'mean', 'last' or 'cls'")


class ClassifierHead(nn.Module):
    """The release's head: mean over patch tokens -> fc_norm -> linear ('mean'), or the last
    token straight into the linear layer ('last', the release's add_pooling_layer=False)."""

    def __init__(self, dim: int, num_classes: int, pool: str = "mean", eps: float = 1e-12):
        super().__init__()
        self.pool = pool
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if pool == "mean" else nn.Identity()
        self.classifier = nn.Linear(dim, num_classes)

    def features(self, hidden, n_prefix, valid=None):
        return self.fc_norm(pool_tokens(hidden, n_prefix, valid, self.pool))

    def forward(self, hidden, n_prefix, valid=None):
        """-> (logits (B, C), features (B, D))."""
        f = self.features(hidden, n_prefix, valid)
        return self.classifier(f), f


class LinearProbeHead(nn.Module):
    """MAE's linear-probe protocol: BatchNorm without affine, then a linear layer, on pooled
    frozen features (mean over the patch tokens of the final-norm output)."""

    def __init__(self, dim: int, num_classes: int, pool: str = "mean"):
        super().__init__()
        self.pool = pool
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def features(self, hidden, n_prefix, valid=None):
        return pool_tokens(hidden, n_prefix, valid, self.pool)

    def forward(self, hidden, n_prefix, valid=None):
        """-> (logits (B, C), features (B, D))."""
        f = self.features(hidden, n_prefix, valid)
        return self.classifier(self.bn(f)), f
