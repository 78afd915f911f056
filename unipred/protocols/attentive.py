"""``attentive``: V-JEPA's attentive probe, one learned query cross-attending to every patch token
of the frozen backbone, then a linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unipred.protocols.features import Features
from unipred.protocols.knn import _scores, topk_accuracy
from unipred.protocols.linear import predict, train_probe
from unipred.protocols.settings import AttentiveSettings, ProtocolError


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
        """The query after cross-attention and its MLP, (B, D). One query makes the keys and
        values linear in the normed tokens ``x``, so the projections move to the other side:
        the score of token j in head h is ``x_j . (W_k,h^T q_h)`` (the key bias adds the same
        ``q_h . b_k,h`` to every score, which the softmax cancels), and the head's output is
        ``W_v,h (sum_j a_hj x_j) + b_v,h`` (the weights sum to 1). Same function as projecting
        every token (``pool_reference``) at a sixteenth of the arithmetic with 16 tokens:
        the (B N, D) x (D, 2 D) product and its two gradients were most of a training step."""
        B, N, D = tokens.shape
        H, d = self.heads, D // self.heads
        x = self.norm1(tokens)
        query = self.query.expand(B, -1, -1)
        q = self.q(self.query[0, 0]).view(H, d)  # the same for every sample
        w_k, w_v = self.kv.weight.view(2, H, d, D).unbind(0)
        u = torch.einsum("hd,hdc->hc", q, w_k) * d**-0.5  # (H, D)
        scores = torch.einsum("bnc,hc->bhn", x, u)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        a = scores.softmax(dim=-1)  # (B, H, N)
        pooled = torch.einsum("bhn,bnc->bhc", a, x)  # per head, the weighted mean of x
        b_v = self.kv.bias.view(2, H, d)[1]
        heads = torch.einsum("bhc,hdc->bhd", pooled, w_v) + b_v  # (B, H, d)
        query = query + self.proj(heads.reshape(B, 1, D))
        query = query + self.mlp(self.norm2(query))
        return query[:, 0]

    def pool_reference(self, tokens: torch.Tensor, valid=None) -> torch.Tensor:
        """``pool`` as written in V-JEPA: every token projected to a key and a value, then
        scaled dot-product attention (the tests' reference)."""
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
