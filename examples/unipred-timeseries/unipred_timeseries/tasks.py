"""Time-series tasks and model sizes, on the classification archives that ``aeon`` ships.

``data.dataset`` names a problem bundled inside the aeon wheel (nothing is downloaded):
``JapaneseVowels`` (12 channels, 7-29 steps, 9 speakers, 270 train / 370 test series),
``PickupGestureWiimoteZ`` (1 accelerometer axis, 29-361 steps, 10 gestures, 50 / 50),
``BasicMotions`` (6 IMU channels, 100 steps, 4 activities, 40 / 40), ``GunPoint``,
``ArrowHead``, ``OSULeaf``, ``ACSF1``, ``ItalyPowerDemand``... (``available_datasets()``).
Training always reads the problem's TRAIN file, validation its TEST file (held out).

One data source (``AeonSeries``) gives unipred's generic objectives their data, which makes
the tasks:

- ``timeseries_pretrain``: next-embedding pretraining on the training series (labels unused).
- ``timeseries_classify``: classification, fine-tuned (``data.mode=finetune``), as a linear
  probe of the frozen backbone (``data.mode=probe``) or evaluated (``data.mode=eval``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

import numpy as np
import torch

from unipred import MODELS, DataConfig, DataSource, ModelConfig, PredictorConfig, register_data


# ------------------------------------------------------------------------------ model sizes
def _size(dim: int, depth: int, heads: int) -> ModelConfig:
    return ModelConfig(
        tokenizer="timeseries",
        tokenizer_args={"patch_size": 4, "in_chans": 1, "max_len": 512},
        predictor=PredictorConfig(
            dim=dim, depth=depth, heads=heads, coord_dims=1, qk_norm_affine=True
        ),  # fmt: skip
    )


@MODELS.register("nepa_ts_small")
def nepa_ts_small() -> ModelConfig:
    """Time series: dim 192, depth 6, 3 heads."""
    return _size(192, 6, 3)


@MODELS.register("nepa_ts_tiny")
def nepa_ts_tiny() -> ModelConfig:
    """Time series: dim 128, depth 4, 4 heads (the README's runs)."""
    return _size(128, 4, 4)


@MODELS.register("nepa_ts_debug")
def nepa_ts_debug() -> ModelConfig:
    """Time series: dim 32, depth 2, 2 heads (tests)."""
    return _size(32, 2, 2)


# ------------------------------------------------------------------------------------- data
def _archive():
    return files("aeon.datasets") / "data"


def available_datasets() -> list[str]:
    """Problems with TRAIN and TEST .ts files inside the installed aeon package."""
    return sorted(d.name for d in _archive().iterdir()
                  if (d / f"{d.name}_TRAIN.ts").is_file() and (d / f"{d.name}_TEST.ts").is_file())  # fmt: skip


@lru_cache(maxsize=8)
def load_split(name: str, split: str) -> tuple[list[np.ndarray], list[str]]:
    """A bundled problem's TRAIN or TEST file -> ([(C, L_i) float32 arrays], [label strings])."""
    path = _archive() / name / f"{name}_{split.upper()}.ts"
    if not path.is_file():
        raise ValueError(f"data.dataset={name!r}: aeon ships no {path.name}; "
                         f"bundled problems: {available_datasets()}")  # fmt: skip
    from aeon.datasets import load_from_ts_file

    X, y = load_from_ts_file(str(path))
    series = [np.nan_to_num(np.asarray(s, dtype=np.float32)) for s in X]
    return series, [str(v) for v in y]


@dataclass
class TimeSeriesData(DataConfig):
    dataset: str = "JapaneseVowels"  # a problem bundled in aeon (a name, not a path)
    normalize: str = "channel"  # channel: per-channel mean/std of the training split |
    #                             series: each series and channel to zero mean, unit std | none
    max_per_class: int = 0  # keep at most N labelled training series per class; 0 = all
    jitter: float = 0.0  # training only: Gaussian noise of this std (after normalisation)
    num_workers: int = 0  # the sets are small and held in RAM


class SeriesDataset(torch.utils.data.Dataset):
    """(series (C, L_i) float tensor, label index) pairs held in RAM."""

    def __init__(self, series, labels, jitter: float = 0.0, seed: int = 0):
        self.series = [torch.from_numpy(s) for s in series]
        self.labels, self.jitter, self.seed = labels, jitter, seed
        self.draws = 0

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, i: int):
        x = self.series[i]
        if self.jitter > 0:
            self.draws += 1
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
            x = x + self.jitter * torch.randn(x.shape, generator=g)
        return x, self.labels[i]


def pad_collate(batch) -> tuple[dict, torch.Tensor]:
    """[(series (C, L_i), label)] -> ({"x": (B, C, max L), "lengths": (B,)}, labels (B,))."""
    lengths = torch.tensor([s.shape[-1] for s, _ in batch])
    x = torch.zeros(len(batch), batch[0][0].shape[0], int(lengths.max()))
    for i, (s, _) in enumerate(batch):
        x[i, :, : s.shape[-1]] = s
    return {"x": x, "lengths": lengths}, torch.tensor([int(y) for _, y in batch])


def _normalise(series: list[np.ndarray], how: str, train: list[np.ndarray]) -> list[np.ndarray]:
    if how == "none":
        return series
    if how == "series":
        return [(s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-6) for s in series]
    if how == "channel":
        cat = np.concatenate(train, axis=1)  # (C, all training steps)
        mean, std = cat.mean(1, keepdims=True), cat.std(1, keepdims=True) + 1e-6
        return [(s - mean) / std for s in series]
    raise ValueError(f"data.normalize={how!r}; use 'channel', 'series' or 'none'")


def build_series_dataset(cfg, split: str, augment: bool) -> SeriesDataset:
    """The TRAIN (split "train") or TEST (split "val") series of ``cfg.data.dataset``;
    ``augment`` adds the training jitter."""
    d = cfg.data
    train_x, train_y = load_split(d.dataset, "train")
    xs, ys = (train_x, train_y) if split == "train" else load_split(d.dataset, "test")
    classes = sorted(set(train_y))  # label indices follow the training split's label set
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(ys) - set(index))
    if unknown:
        raise ValueError(f"{d.dataset}: test labels {unknown} never occur in training")
    labels = [index[y] for y in ys]
    if split == "train" and d.max_per_class > 0:
        order = np.random.default_rng(cfg.seed).permutation(len(xs))
        count: dict[int, int] = {}
        keep = []
        for i in order:
            if count.get(labels[i], 0) < d.max_per_class:
                keep.append(int(i))
                count[labels[i]] = count.get(labels[i], 0) + 1
        keep.sort()
        xs, labels = [xs[i] for i in keep], [labels[i] for i in keep]
    xs = _normalise(xs, d.normalize, train_x)
    jitter = d.jitter if augment else 0.0
    return SeriesDataset(xs, labels, jitter, cfg.seed)


_SMOKE = {"model.name": "nepa_ts_debug", "trainer.global_batch": 4,
          "data.dataset": "JapaneseVowels", "data.max_per_class": 1}  # fmt: skip


# ------------------------------------------------------------------ the data source (-> tasks)
@register_data("timeseries")  # registers timeseries_pretrain and timeseries_classify
class AeonSeries(DataSource):
    """Series classification problems bundled in aeon: TRAIN split to learn, TEST to validate."""

    config = TimeSeriesData
    smoke = _SMOKE

    def build(self, split, augment):
        return build_series_dataset(self.cfg, split, augment)

    def collate(self, split, augment, num_classes=None):
        return pad_collate

    def num_classes(self):
        return len(set(load_split(self.cfg.data.dataset, "train")[1]))

    def adapt_model(self, mc: ModelConfig) -> ModelConfig:
        """The tokenizer's channel count (and longest series) follow the data set."""
        name = self.cfg.data.dataset
        series = load_split(name, "train")[0] + load_split(name, "test")[0]
        chans, longest = series[0].shape[0], max(s.shape[-1] for s in series)
        given = self.cfg.model.tokenizer_args.get("in_chans")
        if given is not None and int(given) != chans:
            raise ValueError(f"model.tokenizer_args.in_chans={given} but {name} has {chans} "
                             "channels")  # fmt: skip
        args = {**mc.tokenizer_args, "in_chans": chans}
        args["max_len"] = max(int(args.get("max_len", 0)), longest)
        return dataclasses.replace(mc, tokenizer_args=args)
