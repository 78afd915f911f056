"""k-D axial rotary position embedding driven by token coordinates.

For k coordinate axes and head dim d, each axis gets ``n = d // (2k)`` frequencies
``theta ** (-i / n)``. The angle of axis a at frequency i is ``2*pi * coord_a * freq_i``.
Angles are laid out ``[axis0 | axis1 | ... ]`` and that block is repeated twice, so the
rotation pairs channel j with channel j + rot/2 ("rotate-half"). With k = 2 and d = 64 this is
exactly the official NEPA layout ``[y | x | y | x]`` (16 frequencies per block, theta = 100).
When ``2k`` does not divide d (video, k = 3) the trailing ``d - rot`` channels pass unrotated.

The train-time coordinate augmentation of the release (shift, jitter, rescale) is one random
draw per forward call, shared by the whole batch and every layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AxialRoPE(nn.Module):
    def __init__(
        self,
        head_dim: int,
        coord_dims: int = 2,
        theta: float = 100.0,
        shift: float | None = None,
        jitter: float | None = None,
        rescale: float | None = None,
    ):
        super().__init__()
        if coord_dims < 1:
            raise ValueError(f"coord_dims must be >= 1, got {coord_dims}")
        n_freq = head_dim // (2 * coord_dims)
        if n_freq < 1:
            raise ValueError(
                f"head_dim {head_dim} too small for {coord_dims}-D RoPE (needs >= {2 * coord_dims})"
            )
        self.head_dim, self.coord_dims, self.n_freq = head_dim, coord_dims, n_freq
        self.rot_dim = 2 * coord_dims * n_freq
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        inv_freq = theta ** (-torch.arange(n_freq, dtype=torch.float32) / n_freq)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def augment(self, coords: torch.Tensor) -> torch.Tensor:
        """Official order: shift per axis, jitter per axis, then one common rescale."""
        k = self.coord_dims
        dev = coords.device
        if self.shift:
            coords = coords + torch.empty(k, device=dev).uniform_(-self.shift, self.shift)
        if self.jitter:
            lj = math.log(self.jitter)
            coords = coords * torch.empty(k, device=dev).uniform_(-lj, lj).exp()
        if self.rescale:
            lr = math.log(self.rescale)
            coords = coords * torch.empty(1, device=dev).uniform_(-lr, lr).exp()
        return coords

    def tables(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (N, k) or (B, N, k) -> cos, sin of shape (..., N, rot_dim) in float32."""
        if coords.shape[-1] != self.coord_dims:
            raise ValueError(
                f"RoPE expects coordinates with {self.coord_dims} axes, got shape {tuple(coords.shape)}"
            )
        coords = coords.float()
        if self.training:
            coords = self.augment(coords)
        # (..., N, k, 1) * (n_freq,) -> (..., N, k, n_freq) -> (..., N, k*n_freq)
        ang = 2 * math.pi * coords.unsqueeze(-1) * self.inv_freq
        ang = ang.flatten(-2)
        ang = torch.cat([ang, ang], dim=-1)  # (..., N, rot_dim)
        return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rot_dim`` channels of x (B, H, N, d) with rotate-half pairing.

    cos/sin are (N, rot) or (B, N, rot); they broadcast over heads.
    """
    rot = cos.shape[-1]
    if cos.dim() == 3:  # (B, N, rot) -> (B, 1, N, rot)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xr, xp = x[..., :rot], x[..., rot:]
    xf = xr.float()  # one upcast (a no-op in fp32), shared by both terms
    h1, h2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-h2, h1], dim=-1)
    out = (xf * cos + rotated * sin).to(x.dtype)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


def grid_coords(*sizes: int, device=None) -> torch.Tensor:
    """Patch-centre coordinates in (-1, 1) for a grid, flattened in row-major (raster) order.

    ``grid_coords(n_h, n_w)`` -> (n_h*n_w, 2) with columns (y, x); any number of axes works
    (video: ``grid_coords(n_t, n_h, n_w)``).
    """
    axes = [
        (2 * (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n - 1) for n in sizes
    ]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


def lift_coords(coords: torch.Tensor, axes, space: int) -> torch.Tensor:
    """Place k-D coordinates (..., N, k) into a ``space``-D RoPE coordinate space: column i
    goes to axis ``axes[i]``, every other axis is fixed at 0 (its centre). With a shared
    (t, y, x) space, an image's (y, x) becomes (0, y, x) and a spectrogram's (time, freq)
    (time, freq, 0): rotations of the unused axes are the identity, so tokens of different
    modalities share one positional code (docs/joint.md)."""
    axes = list(axes)
    if coords.shape[-1] != len(axes):
        raise ValueError(
            f"rope_axes {axes} name {len(axes)} axes but the coordinates have "
            f"{coords.shape[-1]} (shape {tuple(coords.shape)})"
        )
    out = coords.new_zeros(*coords.shape[:-1], space)
    out[..., axes] = coords
    return out
