"""``linear``: MAE's linear probe (BatchNorm without affine + one linear layer) on cached pooled
features, and the probe trainer the attentive and per-layer probes share."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from unipred.nn.heads import LinearProbeHead
from unipred.protocols.features import Features
from unipred.protocols.knn import _scores, topk_accuracy
from unipred.protocols.settings import AttentiveSettings, ProbeSettings


class LinearProbe(LinearProbeHead):
    """MAE's probe, the model's ``head: probe`` (BatchNorm1d without affine, then a linear
    layer initialised N(0, 0.01)), applied to features that are already pooled."""

    def forward(self, x):
        return self.classifier(self.bn(x))


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


def stratified_folds(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """A fold index in [0, k) per sample: each class's samples shuffled (seeded) and dealt
    round the folds, the deal continuing from class to class so fold sizes differ by <= 1."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(labels.shape[0], dtype=torch.long)
    start = 0
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        fold[idx] = (torch.arange(idx.numel()) + start) % k
        start += idx.numel()
    return fold


def cross_validate_lr(train: Features, num_classes: int, s: ProbeSettings, seed=0,
                      device="cpu") -> tuple[float, dict]:  # fmt: skip
    """(the lr of ``s.lr_grid`` with the best mean held-out top-1 over ``s.folds`` stratified
    folds of the training features, {lr: that accuracy}); the first lr of the grid wins ties.
    Only training samples are read: the validation set plays no part in the choice."""
    fold = stratified_folds(train.labels, s.folds, seed)
    acc = {}
    for lr in s.lr_grid:
        hit = n = 0
        for f in range(s.folds):
            held = fold == f
            if not bool(held.any()) or int((~held).sum()) < 2:
                continue
            torch.manual_seed(seed)
            probe = LinearProbe(train.pooled.shape[1], num_classes)
            train_probe(probe, (train.pooled[~held],), train.labels[~held],
                        dataclasses.replace(s, lr=lr), seed=seed, device=device)  # fmt: skip
            scores = predict(probe, (train.pooled[held],), device=device)
            hit += topk_accuracy(scores, train.labels[held]) * int(held.sum())
            n += int(held.sum())
        acc[lr] = hit / max(n, 1)
    return max(s.lr_grid, key=lambda lr: acc[lr]), acc


def run_linear(train: Features, val: Features, num_classes: int, s: ProbeSettings, seed=0,
               device="cpu") -> dict:  # fmt: skip
    """The probe on ``train``, scored on ``val``; with ``s.lr_grid`` its lr is first chosen by
    cross-validation on ``train`` alone (``cross_validate_lr``; the row says which)."""
    extra = {}
    if s.lr_grid:
        lr, acc = cross_validate_lr(train, num_classes, s, seed, device)
        s = dataclasses.replace(s, lr=lr)
        extra = {"lr_cv": {str(k): round(v, 4) for k, v in acc.items()}, "folds": s.folds}
    torch.manual_seed(seed)
    probe = LinearProbe(train.pooled.shape[1], num_classes)
    train_probe(probe, (train.pooled,), train.labels, s, seed=seed, device=device)
    scores = predict(probe, (val.pooled,), device=device)
    return _scores(topk_accuracy(scores, val.labels), topk_accuracy(scores, val.labels, 5),
                   epochs=s.epochs, lr=s.lr, **extra)  # fmt: skip
