"""``knn``: DINO's weighted k-nearest-neighbour classifier on L2-normalised pooled features
(cosine similarity, votes weighted by exp(similarity / T)); the top-k accuracy all protocols report."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unipred.protocols.features import Features
from unipred.protocols.settings import KNNSettings


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
