"""1-D patches of (multichannel) time series of any length: the "timeseries" tokenizer.

Input: a dict ``{"x": (B, C, L), "lengths": (B,)}`` (series zero-padded at the end to the
longest one, ``lengths`` = real steps of each), a plain tensor (B, C, L) or (B, L) when every
step is real. Output: one token per ``patch_size`` steps, in time order, with its patch centre
on a fixed time axis: step t sits at ``2 * t / max_len - 1``, so a step means the same
coordinate in every series and batch, whatever their lengths.
"""

from __future__ import annotations

import torch
from torch import nn

from unipred import TOKENIZERS, Tokens


@TOKENIZERS.register("timeseries")
class TimeSeriesTokenizer(nn.Module):
    """(B, C, L) series + lengths -> Tokens((B, N, D), (N, 1) time coords, (B, N) valid)."""

    coord_dims = 1  # one coordinate axis: time

    def __init__(self, dim: int, patch_size: int = 4, in_chans: int = 1, max_len: int = 512):
        super().__init__()
        if patch_size < 1 or max_len < patch_size:
            raise ValueError(f"timeseries tokenizer: need 1 <= patch_size <= max_len, got "
                             f"patch_size={patch_size}, max_len={max_len}")  # fmt: skip
        self.dim, self.patch_size, self.in_chans, self.max_len = dim, patch_size, in_chans, max_len
        # a linear map of each patch (C channels x patch_size steps), i.e. a strided Conv1d
        self.proj = nn.Conv1d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def example_input(self, batch_size: int = 2) -> dict:
        """Series of different lengths (the first full, the others half), for tests."""
        n = 4 * self.patch_size
        lengths = torch.tensor([n] + [n // 2] * (batch_size - 1))
        return {"x": torch.randn(batch_size, self.in_chans, n), "lengths": lengths}

    def forward(self, batch) -> Tokens:
        if isinstance(batch, dict):
            x, lengths = batch["x"], batch.get("lengths")
        else:
            x, lengths = batch, None
        if x.dim() == 2 and self.in_chans == 1:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != self.in_chans:
            raise ValueError(f"timeseries tokenizer expects (B, {self.in_chans}, L) series, "
                             f"got {tuple(x.shape)}; set model.tokenizer_args.in_chans")  # fmt: skip
        B, _, L = x.shape
        if L > self.max_len:
            raise ValueError(f"series of {L} steps exceed the tokenizer's max_len="
                             f"{self.max_len}; raise model.tokenizer_args.max_len")  # fmt: skip
        p = self.patch_size
        n = -(-L // p)  # a last, partial patch is zero-padded and kept
        x = nn.functional.pad(x.float(), (0, n * p - L))
        tokens = self.proj(x.to(self.proj.weight.dtype)).transpose(1, 2)  # (B, N, D)
        centres = (torch.arange(n, device=x.device, dtype=torch.float32) + 0.5) * p
        coords = (2 * centres / self.max_len - 1).unsqueeze(-1)  # (N, 1)
        valid = None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=x.device).long()
            if lengths.shape != (B,) or bool((lengths < 1).any() | (lengths > L).any()):
                raise ValueError(f"lengths must be (B,) = ({B},) with values in [1, {L}], "
                                 f"got {lengths.tolist()}")  # fmt: skip
            # a token is real when its patch starts inside the series
            valid = torch.arange(n, device=x.device)[None, :] * p < lengths[:, None]
        return Tokens(tokens, coords, valid)
