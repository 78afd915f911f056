"""The one data type every tokenizer returns and every model consumes."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tokens(NamedTuple):
    """A tokenized batch.

    tokens: (B, N, D) embeddings, in the order that defines "next".
    coords: (N, k) or (B, N, k) patch centres normalised to [-1, 1] per axis.
    valid:  (B, N) bool, False at padded positions; None when every token is real.
    """

    tokens: torch.Tensor
    coords: torch.Tensor
    valid: torch.Tensor | None = None
