"""Image patches: Conv2d patch embedding, raster order, 2-D patch-centre coordinates."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from unipred.base.registry import MODELS, TOKENIZERS
from unipred.base.tokens import Tokens
from unipred.nn.model import ModelConfig
from unipred.nn.predictor import PredictorConfig
from unipred.nn.rope import grid_coords


@TOKENIZERS.register("image")
class ImageTokenizer(nn.Module):
    """(B, C, H, W) -> Tokens((B, N, D), (N, 2) coords (y, x), None); N = (H/p)*(W/p).

    Any H, W divisible by the patch size is accepted, so the same weights serve 224 px
    classification and 512 px segmentation.
    """

    coord_dims = 2

    def __init__(self, dim: int = 768, patch_size: int = 14, in_chans: int = 3):
        super().__init__()
        self.dim, self.patch_size, self.in_chans = dim, patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self._coords: dict[tuple, torch.Tensor] = {}

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {p}; "
                f"resize or pad to a multiple of {p}"
            )
        return height // p, width // p

    def coords(self, n_h: int, n_w: int, device) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a dict cache in the graph would force a recompile
            return grid_coords(n_h, n_w, device=device)
        key = (n_h, n_w, str(device))
        if key not in self._coords:
            self._coords[key] = grid_coords(n_h, n_w, device=device)
        return self._coords[key]

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """A small valid input (a 2x2 patch grid), for tests and smoke runs."""
        return torch.randn(batch_size, self.in_chans, 2 * self.patch_size, 2 * self.patch_size)

    @property
    def patch_dim(self) -> int:
        """Values per raw patch (``patches``): in_chans * patch_size**2."""
        return self.in_chans * self.patch_size**2

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> raw pixel patches (B, N, p*p*C) in token order, (y, x, channel)."""
        self._check(x)
        n_h, n_w = self.grid(x.shape[2], x.shape[3])
        B, C, p = x.shape[0], self.in_chans, self.patch_size
        x = x.reshape(B, C, n_h, p, n_w, p).permute(0, 2, 4, 3, 5, 1)  # (B, n_h, n_w, p, p, C)
        return x.reshape(B, n_h * n_w, p * p * C)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"ImageTokenizer expects (B, {self.in_chans}, H, W) images, got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> Tokens:
        self._check(x)
        n_h, n_w = self.grid(x.shape[2], x.shape[3])
        t = self.proj(x)  # (B, D, n_h, n_w)
        t = t.flatten(2).transpose(1, 2)  # (B, N, D), rows top to bottom, columns left to right
        return Tokens(t, self.coords(n_h, n_w, x.device), None)


# --------------------------------------------------------------------------- model sizes
# The image modality's sizes (`NEPA.from_name(...)`, `model.name`): the release's ViT-B/14 and
# ViT-L/14 (pretraining, and the `_cls` fine-tuning variants), smaller ones, and a debug size.
def _vit(dim, depth, heads, patch=14, **kw) -> ModelConfig:
    return ModelConfig(
        tokenizer_args={"patch_size": patch},
        predictor=PredictorConfig(dim=dim, depth=depth, heads=heads, **kw),
    )


def _finetune(cfg: ModelConfig, drop_path: float, num_classes: int = 1000) -> ModelConfig:
    """The release's fine-tune config: bidirectional, affine QK-norm, drop path, mean head."""
    cfg.predictor = dataclasses.replace(
        cfg.predictor, causal=False, qk_norm_affine=True, drop_path=drop_path
    )
    return dataclasses.replace(cfg, head="mean", num_classes=num_classes)


@MODELS.register("nepa_vit_b14")
def nepa_vit_b14() -> ModelConfig:
    """The release's ViT-B/14 for pretraining: patch 14, dim 768, depth 12, 12 heads, causal."""
    return _vit(768, 12, 12, qk_norm_affine=False)


@MODELS.register("nepa_vit_b14_cls")
def nepa_vit_b14_cls() -> ModelConfig:
    """The release's ViT-B/14 fine-tune config: dim 768, depth 12, 12 heads, bidirectional, mean head."""
    return _finetune(nepa_vit_b14(), 0.1)


@MODELS.register("nepa_vit_l14")
def nepa_vit_l14() -> ModelConfig:
    """The release's ViT-L/14 for pretraining: patch 14, dim 1024, depth 24, 16 heads, causal."""
    return _vit(1024, 24, 16, qk_norm_affine=True)


@MODELS.register("nepa_vit_l14_cls")
def nepa_vit_l14_cls() -> ModelConfig:
    """The release's ViT-L/14 fine-tune config: dim 1024, depth 24, 16 heads, bidirectional, mean head."""
    return _finetune(nepa_vit_l14(), 0.2)


@MODELS.register("nepa_vit_s14")
def nepa_vit_s14() -> ModelConfig:
    """ViT-S/14: patch 14, dim 384, depth 12, 6 heads, causal."""
    return _vit(384, 12, 6, qk_norm_affine=True)


@MODELS.register("nepa_vit_ti14")
def nepa_vit_ti14() -> ModelConfig:
    """ViT-Ti/14: patch 14, dim 192, depth 12, 3 heads, causal."""
    return _vit(192, 12, 3, qk_norm_affine=True)


@MODELS.register("nepa_debug")
def nepa_debug() -> ModelConfig:
    """Tiny model for tests and smoke runs (patch 4 on 16-32 px images)."""
    return _vit(64, 2, 4, patch=4, qk_norm_affine=True)
