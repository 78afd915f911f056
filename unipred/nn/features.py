"""Pooled features of a frozen backbone, and a per-sample cache of them: what a linear probe\ntrained inside ``unipred fit`` (``data.mode=probe``) and the evaluation protocols read."""

from __future__ import annotations

import torch
from torch import nn

from unipred.nn.heads import pool_tokens


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
