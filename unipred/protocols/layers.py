"""``layers``: one linear probe per block output (and the final norm), trained together on one
feature pass; the best layer is named."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unipred.protocols.features import Features
from unipred.protocols.knn import _scores, topk_accuracy
from unipred.protocols.linear import LinearProbe, predict, train_probe
from unipred.protocols.settings import ProbeSettings, ProtocolError


class LayerProbes(nn.Module):
    """One LinearProbe per layer, trained together: (L, B, D) -> (L, B, C)."""

    def __init__(self, n_layers: int, dim: int, num_classes: int):
        super().__init__()
        self.probes = nn.ModuleList(LinearProbe(dim, num_classes) for _ in range(n_layers))

    def forward(self, x):
        return torch.stack([p(x[i]) for i, p in enumerate(self.probes)])


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
