"""Video tubelets: Conv3d over (time, height, width), time-major order, 3-D coordinates.

A clip (B, C, T, H, W) is cut into non-overlapping tubelets of ``tubelet_size`` frames by
``patch_size`` x ``patch_size`` pixels (VideoMAE's 2x16x16 by default). Tokens run time-major:
all tubelets of the first time step in raster order, then the next time step, so "next
embedding" means the next patch in the frame, and after a frame's last patch, the first patch
of the following one. Coordinates are (t, y, x) patch centres in (-1, 1).

Image weights can initialise a video tokenizer: ``inflate_patch_kernel`` spreads a 2-D patch
kernel evenly over time (I3D-style, divided by the tubelet size), so a static video gives
exactly the image tokenizer's response; ``inflate_image_state_dict`` does that for a whole
image NEPA checkpoint (the predictor's weights carry over unchanged: RoPE has no parameters),
and ``inflate_checkpoint`` writes it to a file that ``model.init=pretrain:FILE`` loads.
"""

from __future__ import annotations

import torch
from torch import nn

from unipred.base.registry import TOKENIZERS
from unipred.base.tokens import Tokens
from unipred.nn.rope import grid_coords

PATCH_KEY = "tokenizer.proj.weight"


def inflate_patch_kernel(weight: torch.Tensor, tubelet_size: int) -> torch.Tensor:
    """(D, C, p, p) image patch kernel -> (D, C, tubelet_size, p, p) video kernel.

    The kernel is repeated over time and divided by ``tubelet_size``, so the mean over the
    tubelet of a static input is what the image kernel sees: a video of identical frames
    produces the image tokenizer's output (the bias is copied unchanged).
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a (D, C, p, p) Conv2d kernel, got shape {tuple(weight.shape)}")
    if tubelet_size < 1:
        raise ValueError(f"tubelet_size must be >= 1, got {tubelet_size}")
    # (D, C, p, p) -> (D, C, 1, p, p) -> (D, C, t, p, p)
    return weight.unsqueeze(2).repeat(1, 1, tubelet_size, 1, 1) / tubelet_size


def inflate_image_state_dict(state: dict[str, torch.Tensor], tubelet_size: int) -> dict:
    """An image NEPA state dict -> one a video NEPA with the same dim and patch size loads.

    Only the patch kernel changes shape; everything else (cls token, predictor, norms, head)
    is copied, because RoPE is computed from coordinates and has no weights.
    """
    if PATCH_KEY not in state:
        raise ValueError(f"state dict has no {PATCH_KEY!r}; is it an image NEPA checkpoint?")
    out = dict(state)
    w = state[PATCH_KEY]
    if w.dim() == 4:  # leave an already inflated kernel alone
        out[PATCH_KEY] = inflate_patch_kernel(w, tubelet_size)
    return out


def inflate_checkpoint(src: str, dst: str, tubelet_size: int = 2) -> str:
    """Write an image NEPA's weights, inflated for video, where ``model.init`` can load them.

    ``src`` is ``official:PATH`` (a released NEPA image model, see unipred.weights.hub) or one of our
    checkpoints (``.ckpt``, its EMA weights when present). Returns the ``model.init`` value,
    ``pretrain:DST``; the video model must use the image model's dim and patch size.
    """
    if src.startswith("official:"):
        from unipred.weights.hub import load_official_nepa

        state = load_official_nepa(src.split(":", 1)[1]).state_dict()
    else:
        from unipred.train.checkpoint import read_checkpoint

        ckpt = read_checkpoint(src)
        state = ckpt.get("ema_state_dict") or {
            k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
        }
    state = inflate_image_state_dict(state, tubelet_size)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, dst)
    return f"pretrain:{dst}"


@TOKENIZERS.register("video")
class VideoTokenizer(nn.Module):
    """(B, C, T, H, W) -> Tokens((B, N, D), (N, 3) coords (t, y, x), None).

    N = (T / tubelet_size) * (H / patch_size) * (W / patch_size). A 4-D image batch
    (B, C, H, W) is accepted too and treated as a static clip of ``tubelet_size`` frames.
    """

    coord_dims = 3

    def __init__(
        self, dim: int = 768, patch_size: int = 16, tubelet_size: int = 2, in_chans: int = 3
    ):
        super().__init__()
        self.dim, self.patch_size, self.tubelet_size = dim, patch_size, tubelet_size
        self.in_chans = in_chans
        k = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=k, stride=k)
        self._coords: dict[tuple, torch.Tensor] = {}

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Tubelet grid (n_t, n_h, n_w) of a clip; every size must divide evenly."""
        t, p = self.tubelet_size, self.patch_size
        if frames % t or height % p or width % p:
            raise ValueError(
                f"clip of {frames} frames at {height}x{width} does not split into tubelets of "
                f"{t} frames x {p}x{p} px; sample a multiple of {t} frames and resize to a "
                f"multiple of {p}"
            )
        return frames // t, height // p, width // p

    def coords(self, n_t: int, n_h: int, n_w: int, device) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a dict cache in the graph would force a recompile
            return grid_coords(n_t, n_h, n_w, device=device)
        key = (n_t, n_h, n_w, str(device))
        if key not in self._coords:
            self._coords[key] = grid_coords(n_t, n_h, n_w, device=device)  # (N, 3): t, y, x
        return self._coords[key]

    def load_image_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Initialise from an image tokenizer's Conv2d (D, C, p, p) kernel (and bias)."""
        if weight.shape[0] != self.dim or weight.shape[-1] != self.patch_size:
            raise ValueError(
                f"image kernel {tuple(weight.shape)} does not match dim {self.dim} and patch "
                f"size {self.patch_size}"
            )
        with torch.no_grad():
            self.proj.weight.copy_(inflate_patch_kernel(weight, self.tubelet_size))
            if bias is not None:
                self.proj.bias.copy_(bias)

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """A small valid clip (2x2x2 tubelets), for tests and smoke runs."""
        t, p = self.tubelet_size, self.patch_size
        return torch.randn(batch_size, self.in_chans, 2 * t, 2 * p, 2 * p)

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] == self.in_chans:  # image -> static clip
            x = x.unsqueeze(2).expand(-1, -1, self.tubelet_size, -1, -1)
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"VideoTokenizer expects (B, {self.in_chans}, T, H, W) clips, got {tuple(x.shape)}"
            )
        return x

    @property
    def patch_dim(self) -> int:
        """Values per raw tubelet (``patches``): in_chans * tubelet_size * patch_size**2."""
        return self.in_chans * self.tubelet_size * self.patch_size**2

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> raw voxel tubelets (B, N, t*p*p*C) in token order."""
        x = self._clip(x)
        n_t, n_h, n_w = self.grid(*x.shape[2:])
        B, C, t, p = x.shape[0], self.in_chans, self.tubelet_size, self.patch_size
        x = x.reshape(B, C, n_t, t, n_h, p, n_w, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(B, n_t * n_h * n_w, t * p * p * C)

    def forward(self, x: torch.Tensor) -> Tokens:
        x = self._clip(x)
        n_t, n_h, n_w = self.grid(*x.shape[2:])
        t = self.proj(x)  # (B, D, n_t, n_h, n_w)
        t = t.flatten(2).transpose(1, 2)  # (B, N, D), time-major, then rows, then columns
        return Tokens(t, self.coords(n_t, n_h, n_w, x.device), None)
