"""A toy modality: noisy sine waves, cut into 1-D patches (tokenizer, data source and size)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unipred import (
    MODELS,
    TOKENIZERS,
    DataConfig,
    DataSource,
    ModelConfig,
    PredictorConfig,
    Tokens,
    register_data,
)


@TOKENIZERS.register("toy_wave")
class ToyWaveTokenizer(nn.Module):
    """(B, L) waves -> Tokens((B, L/p, D), (L/p, 1) time coords, None)."""

    coord_dims = 1

    def __init__(self, dim: int, patch_size: int = 8):
        super().__init__()
        self.dim, self.patch_size = dim, patch_size
        self.proj = nn.Linear(patch_size, dim)

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        return torch.randn(batch_size, 4 * self.patch_size)

    def forward(self, x: torch.Tensor) -> Tokens:
        n = x.shape[1] // self.patch_size
        tokens = self.proj(x[:, : n * self.patch_size].reshape(x.shape[0], n, self.patch_size))
        coords = torch.linspace(-1, 1, n, device=x.device).unsqueeze(-1)
        return Tokens(tokens, coords, None)


@MODELS.register("nepa_toy")
def nepa_toy() -> ModelConfig:
    """Toy waves: dim 32, depth 2."""
    return ModelConfig(
        tokenizer="toy_wave",
        tokenizer_args={"patch_size": 8},
        predictor=PredictorConfig(dim=32, depth=2, heads=2, coord_dims=1),
    )


@dataclass
class ToyData(DataConfig):
    length: int = 64  # samples per wave
    train_samples: int = 64
    val_samples: int = 16
    num_workers: int = 0


class Waves(torch.utils.data.Dataset):
    """(wave (L,), label): the label is the frequency band (4 classes). With ``dense`` the
    wave is silent outside one burst and the label is per sample: 1 + band inside, 0 outside."""

    def __init__(self, n: int, length: int, seed: int, noise: float = 0.1, dense: bool = False):
        self.n, self.length, self.seed, self.noise, self.dense = n, length, seed, noise, dense

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % 4
        freq = 1 + label + torch.rand((), generator=g)
        phase = 6.3 * torch.rand((), generator=g)
        t = torch.linspace(0, 1, self.length)
        wave = torch.sin(6.2832 * freq * t + phase)
        noise = self.noise * torch.randn(self.length, generator=g)
        if not self.dense:
            return wave + noise, label
        a, b = sorted(torch.randint(0, self.length, (2,), generator=g).tolist())
        on = torch.zeros(self.length, dtype=torch.long)
        on[a : max(b, a + self.length // 4)] = 1
        return wave * on + noise, on * (label + 1)


# one data source: unipred's generic objectives make toy_pretrain, toy_classify and
# toy_segment of it
@register_data("toy", objectives=("pretrain", "classify", "segment"))
class ToyWaves(DataSource):
    """Generated sine waves; the class is the frequency band."""

    config = ToyData
    smoke = {"model.name": "nepa_toy", "trainer.global_batch": 4, "data.train_samples": 8}

    def build(self, split, augment):
        d = self.cfg.data
        n = d.train_samples if split == "train" else d.val_samples
        seed = self.cfg.seed + (0 if split == "train" else 7919)
        dense = self.objective == "segment"
        return Waves(n, d.length, seed, 0.2 if augment else 0.1, dense) if n else None

    def num_classes(self):
        return 4 + (self.objective == "segment")  # segmentation: + "silence"
