"""Audio clips from folders, CSV lists or webdataset shards, decoded with torchcodec.

Layouts read (``list_audio``):
  * ``root/<class>/**/<clip>.wav|flac|mp3|ogg|opus|m4a`` — the label is the sub-folder name
    (folders named like ``_background_noise_`` are left out);
  * ``csv=FILE``: rows naming a clip (``path_column``, relative to ``root``) and its label
    (``label_column``: class names, or integers); ``where="fold=1,2,3"`` keeps matching rows
    (ESC-50's folds). Class names are ordered over the whole CSV, so every split agrees;
  * audio files directly under ``root`` and no CSV — unlabelled (label -1), for pretraining.
Shards (``unipred data pack-audio``) hold per clip the audio bytes under their extension
(``flac`` by default), the label under ``cls`` and the source under ``json``.

Every clip becomes a mono float waveform at ``sample_rate`` (torchcodec decodes, torchaudio
resamples each clip on its own, so padding a batch never touches the resampling). A file that
fails to decode is skipped and counted (``skipped/corrupt`` in
``unipred.data.accounting.COUNTER``), never fatal. ``pad_collate`` batches clips of different
lengths as ``({"wave": (B, S), "lengths": (B,)}, labels (B,))`` for the audio tokenizers.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from unipred.base.extras import require
from unipred.data.accounting import (
    COUNTER,
    BadSampleCounter,
    SkipSample,
    reason_of,
    register_reasons,
)
from unipred.data.book import SampleBook
from unipred.data.scan import Scan, ScanReport, list_dir, log_classes, read_regular
from unipred.data.shards import ShardReader, is_shard_spec

# conversions only audio makes (the skip reasons are the core's)
register_reasons(converted=("resampled", "silent", "wrong_extension"))

AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")
SKIP_DIRS = ("_background_noise_",)  # Speech Commands' noise folder is not a class
log = logging.getLogger(__name__)


# codec names (torchcodec metadata) each file extension should hold
_EXT_CODECS = {".wav": ("pcm_",), ".flac": ("flac",), ".mp3": ("mp3",),
               ".ogg": ("vorbis", "opus", "flac"), ".opus": ("opus",), ".m4a": ("aac", "alac")}  # fmt: skip


def _wav_truncated(data: bytes) -> bool:
    """A RIFF/WAVE file whose ``data`` chunk claims more bytes than the file holds (FFmpeg
    decodes what is there without complaint)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if kind == b"data":
            return pos + 8 + size > len(data)
        pos += 8 + size + (size & 1)
    return True  # no data chunk before the end of the file


def decode_audio(
    source, sample_rate: int, notes: list | None = None, ext: str = ""
) -> torch.Tensor:
    """A file path or encoded bytes -> mono float32 waveform (S,) at ``sample_rate``.

    Raises on anything unreadable (``SkipSample`` with its reason for an empty or truncated
    file); callers count and skip. With ``notes`` (a list), usable oddities are appended as
    conversion reasons: ``resampled`` (a source rate below ``sample_rate``, which lacks the
    upper band, or above 48 kHz; 44.1/48 kHz -> 16 kHz is routine and not noted), ``silent``
    (all zero) and ``wrong_extension`` (the codec is not what ``ext`` says).
    """
    decoders = require("torchcodec.decoders", "audio", "decoding audio")  # needs FFmpeg's libs
    data = source
    if not isinstance(source, (bytes, bytearray)):
        ext = ext or Path(source).suffix
        data = read_regular(str(source))  # a FIFO named .wav never blocks a worker
    ext = ext.lower() if not ext or ext.startswith(".") else "." + ext.lower()
    if len(data) == 0:
        raise SkipSample("empty", "zero-length file")
    if _wav_truncated(bytes(data)):
        raise SkipSample("truncated", "WAV data chunk longer than the file")
    dec = decoders.AudioDecoder(bytes(data))
    samples = dec.get_all_samples()
    wave = samples.data.float().mean(dim=0)  # (C, S) -> (S,): downmix to mono
    if wave.numel() == 0:
        raise SkipSample("empty", "no audio samples")
    if not bool(torch.isfinite(wave).all()):
        raise ValueError("non-finite audio samples")
    if notes is not None:
        rate, codec = int(samples.sample_rate), str(getattr(dec.metadata, "codec", "") or "")
        if rate < sample_rate or rate > 48000:
            notes.append("resampled")
        if not bool(wave.abs().max() > 0):
            notes.append("silent")
        want = _EXT_CODECS.get(ext)
        if want and codec and not codec.startswith(want):
            notes.append("wrong_extension")
    return resample(wave, samples.sample_rate, sample_rate)


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int):
    ta = require("torchaudio", "audio", "resampling audio")
    return ta.transforms.Resample(orig, new)  # builds the sinc kernel once


def resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """torchaudio's band-limited resampling of one clip, with the kernel cached per rate pair."""
    if orig == new:
        return wave
    return _resampler(int(orig), int(new))(wave)


class DecodeCache:
    """Decoded, resampled waveforms kept in RAM, least recently used dropped beyond
    ``max_mb``: for data sets small enough to decode once (ESC-50, Speech Commands, the
    demo's digits), where decoding and resampling every epoch would cost more than the step.

    Keyed by (path, size, mtime, rate), so an edited file is decoded again. One cache per
    process is shared by every reader of that process (``shared_cache``): successive runs
    in one process (the demos' fine-tuning seeds) decode each file once. DataLoader workers
    are separate processes, so each worker holds its own copy.
    """

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes, self.hits, self.misses = 0, 0, 0
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(path: Path | str, sample_rate: int) -> tuple:
        st = os.stat(path)
        return (str(path), st.st_size, st.st_mtime_ns, int(sample_rate))

    def get(self, path: Path | str, sample_rate: int) -> torch.Tensor:
        """The decoded clip (decoding on a miss; decoder errors propagate to the caller)."""
        k = self.key(path, sample_rate)
        with self._lock:
            wave = self._items.get(k)
            if wave is not None:
                self._items.move_to_end(k)
                self.hits += 1
                return wave
        wave = decode_audio(str(path), sample_rate)
        with self._lock:
            self.misses += 1
            size = wave.numel() * wave.element_size()
            if size <= self.max_bytes and k not in self._items:
                self._items[k] = wave
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size()
        return wave


_SHARED: dict[str, DecodeCache | None] = {"cache": None}


def shared_cache(max_mb: float) -> DecodeCache | None:
    """This process's decode cache (None when ``max_mb`` <= 0); a larger size grows it."""
    if max_mb <= 0:
        return None
    cache = _SHARED["cache"]
    if cache is None:
        cache = _SHARED["cache"] = DecodeCache(max_mb)
    cache.max_bytes = max(cache.max_bytes, int(max_mb * 2**20))
    return cache


@dataclass
class ClipTransform:
    """Crop to ``max_seconds`` (random offset when training, the start otherwise), pad with
    silence up to ``min_seconds``, and when training apply a random gain of +-``gain_db``."""

    sample_rate: int = 16000
    max_seconds: float = 10.0
    min_seconds: float = 0.5
    train: bool = False
    gain_db: float = 0.0

    def __call__(self, wave: torch.Tensor, rng=random) -> torch.Tensor:
        hi = int(self.max_seconds * self.sample_rate)
        if self.max_seconds > 0 and wave.numel() > hi:
            start = rng.randint(0, wave.numel() - hi) if self.train else 0
            wave = wave[start : start + hi]
        lo = int(self.min_seconds * self.sample_rate)
        if wave.numel() < lo:
            wave = torch.nn.functional.pad(wave, (0, lo - wave.numel()))
        if self.train and self.gain_db > 0:
            wave = wave * 10 ** (rng.uniform(-self.gain_db, self.gain_db) / 20)
        return wave


def _parse_where(where: str) -> tuple[str, set[str]] | None:
    """'fold=1,2,3' -> ('fold', {'1', '2', '3'}); '' -> None."""
    if not where:
        return None
    if "=" not in where:
        raise ValueError(f"where must look like 'column=v1,v2', got {where!r}")
    col, vals = where.split("=", 1)
    return col.strip(), {v.strip() for v in vals.split(",") if v.strip()}


def _read_csv(root: Path, csv_path: str, path_col: str, label_col: str, where: str):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    cond = _parse_where(where)
    for col in [path_col, label_col] + ([cond[0]] if cond else []):
        if col not in rows[0]:
            raise ValueError(f"{csv_path}: no column {col!r} (columns: {list(rows[0])})")
    labels = [r[label_col].strip() for r in rows]
    numeric = all(v.lstrip("-").isdigit() for v in labels)
    classes = [] if numeric else sorted(set(labels))  # over all rows: splits agree
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for r, lab in zip(rows, labels):
        if cond and r[cond[0]].strip() not in cond[1]:
            continue
        items.append((root / r[path_col].strip(), int(lab) if numeric else index[lab]))
    return items, classes


def list_audio(
    root: str | Path,
    csv_path: str = "",
    path_column: str = "path",
    label_column: str = "label",
    where: str = "",
    classes: list[str] | None = None,
) -> tuple[list[tuple[Path, int]], list[str]]:
    """-> ([(file, label)], class names) for a folder or CSV layout (see the module doc).

    ``classes`` fixes the name -> index order (pass the training split's to the validation
    split); clips of a class it does not name are left out with a warning.
    """
    root = Path(root)
    if csv_path:
        return _read_csv(root, csv_path, path_column, label_column, where)
    if not root.is_dir():
        raise ValueError(f"audio data folder does not exist: {root}")
    report = ScanReport()
    entries = list_dir(str(root), report)
    subdirs = [
        e.name for e in entries if e.is_dir(follow_symlinks=True) and e.name not in SKIP_DIRS
    ]
    if not subdirs:  # flat folder: unlabelled clips
        files = [Path(e.path) for e in entries if Path(e.name).suffix.lower() in AUDIO_EXTS]
        _log_scan(root, report)
        return [(p, -1) for p in files], []
    classes = list(classes) if classes else subdirs
    index = {c: i for i, c in enumerate(classes)}
    unknown = [d for d in subdirs if d not in index]
    if unknown:
        log.warning("%s: sub-folders %s are not known classes; left out", root, unknown)
    # each file once, no symlink loop or link out of root (unipred.data.scan)
    scan = Scan(str(root), report=report)
    for name in subdirs:
        if name in index:
            scan.add(str(root / name), index[name])
    items = [(Path(p), y) for p, y in scan.finish() if Path(p).suffix.lower() in AUDIO_EXTS]
    _log_scan(root, report)
    return items, classes


def _log_scan(root, report: ScanReport) -> None:
    if report.line():
        log.warning("%s: %s", root, report.line())


class AudioFolder(Dataset):
    """Map-style clips from ``list_audio``; items are (wave (S,), label).

    A clip that fails to decode is recorded in the reader's
    :class:`~unipred.data.book.SampleBook` (once per epoch, under one reason) and replaced by
    the next readable one, so broken files never stop an epoch (and batches keep their size);
    the engine stops a run only above ``data.max_bad_fraction``.
    """

    def __init__(self, items, classes, transform: ClipTransform, max_retries: int = 20,
                 counter: BadSampleCounter | None = None, cache: DecodeCache | None = None,
                 root: str = ""):  # fmt: skip
        if not items:
            raise ValueError("no audio clips found")
        self.items, self.classes, self.transform = list(items), list(classes), transform
        # max_retries is kept for callers; a substitute is searched over the whole set
        self.max_retries, self.counter, self.cache = max_retries, counter or COUNTER, cache
        root = root or os.path.commonpath([str(self.items[0][0]), str(self.items[-1][0])])
        self.book = SampleBook(self.items, root, self.counter)

    def __len__(self) -> int:
        return len(self.items)

    def _fetch(self, j: int, counter):
        path, label = self.items[j]
        notes: list = []
        try:
            rate = self.transform.sample_rate
            if self.cache:  # (conversions are noted when a clip is decoded, not on hits)
                wave = self.cache.get(path, rate)
            else:
                wave = decode_audio(str(path), rate, notes)
        except Exception as err:  # any decoder failure: skip the file, never the epoch
            counter.count(reason_of(err), str(path), err)
            return None
        if notes:  # one reason per file: the first
            counter.count(notes[0], str(path))
        return self.transform(wave), label

    def __getitem__(self, i: int):
        if not 0 <= i < len(self.items):
            raise IndexError(i)  # also ends plain `for x in dataset` loops
        # a substitute is recorded when its own index comes up, so each file counts once
        return self.book.first_good(i, self._fetch)


class AudioShardDataset(ShardReader):
    """Streaming clips from webdataset shards (pattern, folder, ``pipe:`` or URL).

    Shard splitting, per-epoch reshuffling and the per-rank quota are the image reader's
    (:class:`unipred.data.shards.ShardReader`); only decoding differs.
    """

    def __init__(self, spec: str, transform: ClipTransform, shuffle_buffer: int = 1000,
                 seed: int = 0, counter: BadSampleCounter | None = None):  # fmt: skip
        super().__init__(spec, transform, transform.train, shuffle_buffer, seed, counter=counter)

    def decode(self, sample: dict):
        """A raw sample dict -> (wave, label), or None (counted) when it cannot be read."""
        what = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        notes: list = []
        try:
            ext = next((e for e in AUDIO_EXTS if e[1:] in sample), None)
            if ext is None:
                raise ValueError(f"no audio in sample (keys {sorted(sample)})")
            wave = decode_audio(sample[ext[1:]], self.transform.sample_rate, notes, ext)
        except Exception as err:  # any decoder failure: drop the sample, never the epoch
            self.counter.count(reason_of(err), what, err)
            return None
        if notes:  # one reason per sample: the first
            self.counter.count(notes[0], what)
        label = int(sample["cls"]) if "cls" in sample else -1
        return self.transform(wave), label


def audio_dataset(spec: str, transform: ClipTransform, csv_path: str = "",
                  path_column: str = "path", label_column: str = "label", where: str = "",
                  classes: list[str] | None = None, shuffle_buffer: int = 1000, seed: int = 0,
                  counter: BadSampleCounter | None = None, cache_mb: float = 0):  # fmt: skip
    """The right reader for ``spec``: shards -> AudioShardDataset, else AudioFolder (which
    keeps decoded clips in this process's :class:`DecodeCache` when ``cache_mb`` > 0)."""
    if not spec:
        raise ValueError("empty audio data path")
    # fail now, in one line, rather than count every clip as unreadable
    require("torchcodec.decoders", "audio", "reading audio files")
    require("torchaudio", "audio", "reading audio files")
    if is_shard_spec(spec) and not csv_path:
        return AudioShardDataset(spec, transform, shuffle_buffer, seed, counter)
    items, names = list_audio(spec, csv_path, path_column, label_column, where, classes)
    if items:
        log_classes(spec, [y for _, y in items], names, "clips")
    return AudioFolder(items, names, transform, counter=counter, cache=shared_cache(cache_mb),
                       root=spec)  # fmt: skip


def pad_collate(batch: list) -> tuple[dict, torch.Tensor]:
    """[(wave (S_i,), label)] -> ({"wave": (B, max S), "lengths": (B,)}, labels (B,)).

    Clips are zero-padded at the end; ``lengths`` tells the tokenizer which samples are real.
    ``None`` items (samples a reader already counted as skipped) are dropped.
    """
    batch = [b for b in batch if b is not None]
    if not batch:
        raise ValueError("every sample of this batch failed to decode")
    lengths = torch.tensor([b[0].numel() for b in batch], dtype=torch.long)
    wave = torch.zeros(len(batch), int(lengths.max()))
    for i, (w, _) in enumerate(batch):
        wave[i, : w.numel()] = w
    labels = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
    return {"wave": wave, "lengths": lengths}, labels


@torch.no_grad()
def logmel_stats(dataset, tokenizer_args: dict | None = None, max_clips: int = 500):
    """Mean and std of the log-mel values the "audio" tokenizer sees (over the real frames of
    up to ``max_clips`` clips spread evenly over the set): put them in ``tokenizer_args``."""
    from unipred.tokenizers.audio import AudioSpectrogramTokenizer

    args = {k: v for k, v in (tokenizer_args or {}).items() if k not in ("mean", "std")}
    tk = AudioSpectrogramTokenizer(dim=1, **args)
    s = s2 = n = 0.0
    step = max(1, len(dataset) // max_clips)  # spread over the set: folders are class-sorted
    for i in range(0, len(dataset), step)[:max_clips]:
        wave = dataset[i][0]
        frames = int(tk.n_frames(wave.numel()))
        if frames < 1:
            continue
        spec = tk.spectrogram(wave[None])[0, :frames].double()
        s, s2, n = s + spec.sum().item(), s2 + (spec**2).sum().item(), n + spec.numel()
    if n == 0:
        raise ValueError("no clip long enough to compute log-mel statistics")
    mean = s / n
    return mean, max(s2 / n - mean**2, 1e-12) ** 0.5
