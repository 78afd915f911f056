"""Audio data: NEPA pretraining on log-mel patches and clip classification (fine-tune, linear
probe, eval), the generic objectives of unipred.task on the ``audio`` data source.

Data (``data.root`` / ``data.val_root``): webdataset shards from ``unipred data pack-audio``,
a folder of class sub-folders, or a folder plus a CSV (``data.csv``, ``data.where`` for
ESC-50-style folds); see ``unipred.tasks.audio.data``. An empty ``data.root`` means the spoken-digit
set synthesised with espeak-ng/flite (``unipred.tasks.audio.spoken_digits``): training voices for
``train``, held-out voices for ``val``. Where neither synthesiser is installed, tone patterns
stand in (with a warning) so the tasks still run.

Model sizes registered here (the "audio" tokenizer on the image sizes' predictors):
``nepa_audio_b16`` / ``nepa_audio_b16_cls`` (AudioMAE's 16x16 patches on 128 mels),
``nepa_audio_s16``, ``nepa_audio_tiny`` (the demo's, dim 128, depth 4) and
``nepa_audio_debug`` (dim 64, depth 2, 32 mels, for tests).
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from unipred.tasks.audio.data import ClipTransform, audio_dataset, list_audio, pad_collate
from unipred.tasks.audio.spoken_digits import DIGITS, available_engines, synthesize, tone_digit

from unipred.base.registry import MODELS
from unipred.base.warn import warn
from unipred.nn.model import ModelConfig, model_config
from unipred.task import DataConfig, DataSource, check_tokenizer, model_tokenizer, register_data


# ------------------------------------------------------------------------------ model sizes
def _audio(base: str, **tokenizer_args) -> ModelConfig:
    cfg = model_config(base, tokenizer="audio")
    cfg.tokenizer_args = {"patch_size": 16, **tokenizer_args}
    return cfg


@MODELS.register("nepa_audio_b16")
def nepa_audio_b16() -> ModelConfig:
    """Audio log-mel, 16x16 patches: dim 768, depth 12, 12 heads (ViT-B), causal."""
    return _audio("nepa_vit_b14")


@MODELS.register("nepa_audio_b16_cls")
def nepa_audio_b16_cls() -> ModelConfig:
    """Audio log-mel, 16x16 patches, fine-tune config: ViT-B, bidirectional, mean head."""
    return _audio("nepa_vit_b14_cls")


@MODELS.register("nepa_audio_s16")
def nepa_audio_s16() -> ModelConfig:
    """Audio log-mel, 16x16 patches: dim 384, depth 12, 6 heads (ViT-S), causal."""
    return _audio("nepa_vit_s14")


@MODELS.register("nepa_audio_tiny")
def nepa_audio_tiny() -> ModelConfig:
    """Audio log-mel, 16x16 patches: dim 128, depth 4, 4 heads (the digits demo's)."""
    cfg = _audio("nepa_debug")
    cfg.predictor = dataclasses.replace(cfg.predictor, dim=128, depth=4, heads=4)
    return cfg


@MODELS.register("nepa_audio_debug")
def nepa_audio_debug() -> ModelConfig:
    """Audio, 32 mels, 16x16 patches: dim 64, depth 2, 4 heads (tests and smoke runs)."""
    return _audio("nepa_debug", n_mels=32)


# ------------------------------------------------------------------------------ data config
@dataclass
class AudioData(DataConfig):
    """Clip decoding, cropping and the optional CSV layout (pretraining and classification)."""

    sample_rate: int = 16000  # clips are resampled to this; the tokenizer gets the same rate
    max_seconds: float = 10.0  # longer clips are cropped (random offset when training)
    min_seconds: float = 0.5  # shorter clips are padded with silence
    gain_db: float = 0.0  # random gain +-dB when training
    csv: str = ""  # a CSV naming clips (relative to root) and labels; "" = folder layout
    val_csv: str = ""  # "" = data.csv
    path_column: str = "path"
    label_column: str = "label"
    where: str = ""  # keep CSV rows matching "column=v1,v2" (e.g. "fold=1,2,3,4")
    val_where: str = ""
    max_per_class: int = 0  # keep at most N training clips per class (label-scarce runs); 0 = all
    num_workers: int = 4
    shuffle_buffer: int = 1000
    cache_mb: float = 0  # keep decoded clips of folder/CSV data in RAM up to this size; 0 = off
    # synthesised spoken digits when root is "": cache folder ("" = ~/.cache/unipred) and size
    digits_dir: str = ""
    train_per_class: int = 200
    val_per_class: int = 40
    digits_seed: int = 0  # the synthesis seed (the data set's identity, apart from cfg.seed)


def digits_cache(d: AudioData) -> Path:
    """Where the synthesised digits of this config live."""
    base = Path(d.digits_dir or os.environ.get("UNIPRED_CACHE", "~/.cache/unipred")).expanduser()
    return base / f"spoken_digits_{d.train_per_class}_{d.val_per_class}_{d.digits_seed}"


class ToneDigits(torch.utils.data.Dataset):
    """Stand-in for the spoken digits where no synthesiser exists: (wave, label) tone codes."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return tone_digit(i % len(DIGITS), self.seed * 1_000_003 + i), i % len(DIGITS)


def _limit_per_class(items: list, n: int, seed: int) -> list:
    if n <= 0:
        return items
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    kept, count = [], {}
    for path, label in shuffled:
        if count.get(label, 0) < n:
            kept.append((path, label))
            count[label] = count.get(label, 0) + 1
    return sorted(kept)


def build_audio_dataset(cfg, split: str, augment: bool | None = None):
    """The train or val dataset of an audio task config (synthesised digits when root is "").
    ``augment`` (default: the split is "train") turns the random crop and gain on or off."""
    d: AudioData = cfg.data
    train = split == "train"
    aug = train if augment is None else augment
    tf = ClipTransform(d.sample_rate, d.max_seconds, d.min_seconds, aug, d.gain_db)
    if not d.root:
        n = (d.train_per_class if train else d.val_per_class) * len(DIGITS)
        if n <= 0:
            return None
        if not available_engines():
            warn("espeak-ng/flite not found: tone patterns stand in for spoken digits "
                 "(apt-get install -y espeak-ng flite)")  # fmt: skip
            return ToneDigits(n, cfg.seed + (0 if train else 7919))
        root = synthesize(digits_cache(d), d.train_per_class, d.val_per_class, d.digits_seed)
        spec, csv_path, where = str(root / ("train" if train else "test")), "", ""
    else:
        spec = d.root if train else d.val_root
        csv_path = d.csv if train else (d.val_csv or d.csv)
        where = d.where if train else d.val_where
    if not spec:
        return None
    classes = None
    if not train and not csv_path and Path(d.root or spec).is_dir() and d.root:
        classes = list_audio(d.root)[1] or None  # validation uses the training class order
    ds = audio_dataset(spec, tf, csv_path, d.path_column, d.label_column, where, classes,
                       d.shuffle_buffer, cfg.seed, cache_mb=d.cache_mb)  # fmt: skip
    if train and d.max_per_class and hasattr(ds, "items"):
        ds.items = _limit_per_class(ds.items, d.max_per_class, cfg.seed)
    return ds


KNOWN_TOKENIZERS = ("image", "audio", "video")  # a plugin's tokenizer is not judged


def check_audio_config(cfg) -> None:
    """Shape mistakes of an audio config: tokenizer kind, mel bins vs the frequency patch,
    the tokenizer's sample rate vs data.sample_rate (one line each, before anything is built)."""
    name, args = model_tokenizer(cfg)
    check_tokenizer(name, "audio", cfg.model.name, KNOWN_TOKENIZERS)
    if name != "audio":
        return
    patch = args.get("patch_size", 16)
    pf = patch if isinstance(patch, int) else patch[-1]
    mels = int(args.get("n_mels", 128))
    if mels % pf:
        raise ValueError(
            f"model.tokenizer_args.n_mels={mels} is not a multiple of the frequency patch "
            f"size {pf} (model.tokenizer_args.patch_size)"
        )
    given = cfg.model.tokenizer_args.get("sample_rate")
    if given is not None and int(given) != cfg.data.sample_rate:
        raise ValueError(
            f"model.tokenizer_args.sample_rate={given} but data.sample_rate="
            f"{cfg.data.sample_rate}: leave the tokenizer's unset (it follows the data)"
        )


# smoke runs synthesise 20 clips into the temp folder, never into the user's cache
_SMOKE = {"model.name": "nepa_audio_debug", "trainer.global_batch": 4, "data.num_workers": 0,
          "data.train_per_class": 1, "data.val_per_class": 1, "data.max_seconds": 2.0,
          "data.digits_dir": str(Path(tempfile.gettempdir()) / "unipred-audio-smoke")}  # fmt: skip


@register_data("audio")
class AudioClips(DataSource):
    """Audio clips from shards, class folders or a CSV (synthesised spoken digits if no root).

    The tokenizer's sample rate follows data.sample_rate."""

    config = AudioData
    smoke = _SMOKE

    @classmethod
    def check_config(cls, cfg, objective):
        check_audio_config(cfg)

    def num_classes(self):
        return None if self.cfg.data.root else len(DIGITS)  # the spoken digits: 10

    def build(self, split, augment):
        return build_audio_dataset(self.cfg, split, augment)

    def collate(self, split, augment, num_classes=None):
        return pad_collate

    def adapt_model(self, mc: ModelConfig) -> ModelConfig:
        """The tokenizer's sample rate follows data.sample_rate (a conflict is an error)."""
        rate = self.cfg.data.sample_rate
        given = self.cfg.model.tokenizer_args.get("sample_rate")
        if given is not None and int(given) != rate:
            raise ValueError(
                f"model.tokenizer_args.sample_rate={given} but data.sample_rate={rate}"
            )
        mc.tokenizer_args = {**mc.tokenizer_args, "sample_rate": rate}
        return mc


AudioPretrain = AudioClips.tasks["pretrain"]
AudioClassify = AudioClips.tasks["classify"]
