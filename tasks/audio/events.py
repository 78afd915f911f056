"""Generated sound events with a class for every 10 ms: audio for the generic segmentation
objective (``audio_events_segment``) and its pretraining (``audio_events_pretrain``).

Each clip is a sequence of events of random length (0.1-0.5 s): silence, a steady tone, a
rising sweep, or a noise burst (4 classes), mixed with faint background noise; the label of
every 10 ms frame (``data.label_rate`` per second) is the event under it. Sample i is
generated from ``seed + i`` alone (map-style, identical on every run and rank). The spectrogram
tokenizer gives (time, frequency) tokens; the labels span time only (``label_axes = (0,)``),
so the per-token logits of one time step are averaged over frequency before they are
stretched onto the frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from unipred.tasks.audio.tasks import check_audio_config

from unipred.nn.model import ModelConfig
from unipred.task import DataConfig, DataSource, register_data

EVENTS = ("silence", "tone", "sweep", "noise")


@dataclass
class AudioEventsData(DataConfig):
    sample_rate: int = 16000
    seconds: float = 2.0  # clip length
    label_rate: int = 100  # labels per second (one per 10 ms)
    train_samples: int = 512
    val_samples: int = 64
    num_workers: int = 0


class SoundEvents(torch.utils.data.Dataset):
    """(wave (S,), labels (seconds * label_rate,)) generated from ``seed + index``."""

    def __init__(self, n: int, seconds: float, sample_rate: int, label_rate: int, seed: int):
        self.n, self.seconds, self.rate, self.label_rate, self.seed = (
            n, seconds, sample_rate, label_rate, seed,
        )  # fmt: skip

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n_lab = int(self.seconds * self.label_rate)
        step = self.rate // self.label_rate  # samples per label frame
        wave = 0.003 * torch.randn(n_lab * step, generator=g)
        labels = torch.zeros(n_lab, dtype=torch.long)
        t0 = 0
        while t0 < n_lab:
            length = int(torch.randint(10, 51, (), generator=g))  # 0.1-0.5 s
            cls = int(torch.randint(len(EVENTS), (), generator=g))
            t1 = min(t0 + length, n_lab)
            labels[t0:t1] = cls
            m = (t1 - t0) * step
            t = torch.arange(m) / self.rate
            amp = 0.2 + 0.3 * float(torch.rand((), generator=g))
            f = 300 + 2500 * float(torch.rand((), generator=g))
            if cls == 1:
                seg = torch.sin(2 * math.pi * f * t)
            elif cls == 2:  # a sweep from f up to 2f over the event
                seg = torch.sin(2 * math.pi * f * (t + t * t / (2 * max(float(t[-1]), 1e-3))))
            elif cls == 3:
                seg = torch.randn(m, generator=g).clamp(-3, 3) / 2
            else:
                seg = torch.zeros(m)
            wave[t0 * step : t1 * step] += amp * seg
            t0 = t1
        return wave, labels


def pad_dense_collate(batch, ignore_index: int = 255):
    """[(wave (S_i,), labels (L_i,))] -> ({"wave", "lengths"}, labels (B, max L)), the labels
    padded with ``ignore_index``."""
    lengths = torch.tensor([w.numel() for w, _ in batch], dtype=torch.long)
    wave = torch.zeros(len(batch), int(lengths.max()))
    labels = torch.full((len(batch), max(y.numel() for _, y in batch)), ignore_index)
    for i, (w, y) in enumerate(batch):
        wave[i, : w.numel()] = w
        labels[i, : y.numel()] = y
    return {"wave": wave, "lengths": lengths}, labels


class _Collate:  # picklable for worker processes
    def __init__(self, ignore_index: int, dense: bool):
        self.ignore_index, self.dense = ignore_index, dense

    def __call__(self, batch):
        inputs, labels = pad_dense_collate(batch, self.ignore_index)
        return (inputs, labels) if self.dense else inputs


@register_data("audio_events", objectives=("pretrain", "segment"))
class AudioEvents(DataSource):
    """Generated sound events (silence, tone, sweep, noise), a label every 10 ms."""

    config = AudioEventsData
    label_axes = (0,)  # labels span time; the frequency tokens of a time step are averaged
    smoke = {"model.name": "nepa_audio_debug", "trainer.global_batch": 4,
             "data.train_samples": 8, "data.val_samples": 4, "data.seconds": 1.0}  # fmt: skip

    @classmethod
    def check_config(cls, cfg, objective):
        check_audio_config(cfg)
        d = cfg.data
        if d.label_rate <= 0 or d.sample_rate % d.label_rate:
            raise ValueError(f"data.label_rate={d.label_rate} must divide data.sample_rate="
                             f"{d.sample_rate}")  # fmt: skip

    def num_classes(self):
        return len(EVENTS)

    def build(self, split, augment):
        d = self.cfg.data
        n = d.train_samples if split == "train" else d.val_samples
        seed = self.cfg.seed + (0 if split == "train" else 7919)
        return SoundEvents(n, d.seconds, d.sample_rate, d.label_rate, seed) if n > 0 else None

    def collate(self, split, augment, num_classes=None):
        ign = getattr(self.cfg.data, "ignore_index", 255)
        return _Collate(ign, dense=self.objective != "pretrain")

    def adapt_model(self, mc: ModelConfig) -> ModelConfig:
        mc.tokenizer_args = {**mc.tokenizer_args, "sample_rate": self.cfg.data.sample_rate}
        return mc


AudioEventsPretrain = AudioEvents.tasks["pretrain"]
AudioEventsSegment = AudioEvents.tasks["segment"]
