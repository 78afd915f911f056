"""Video clips from folders, CSV lists or webdataset shards, decoded with torchcodec.

Layouts read (``list_videos``):
  * ``root/<class>/<clip>.mp4|webm|mkv|avi|mov`` — the label is the sub-folder name;
  * ``root/<class>/<clip>/*.jpg|png`` — a folder of pre-extracted frames is one clip;
  * a CSV file ``path,label`` (paths relative to the CSV; labels class names or integers);
  * files directly under ``root`` — unlabelled (label -1), for pretraining.
Shards (written by ``unipred data pack-video``) hold per clip the original video bytes under
their extension (``mp4``, ``webm``, ...) or frames as ``f00000.jpg``, ``f00001.jpg``, ...,
and the label under ``cls``.

Frame sampling: ``num_frames`` frames ``stride`` apart, from a random start when training and
centred otherwise; a clip shorter than that span is sampled evenly over its whole length.
A clip that fails to decode is skipped and counted in the shared bad-sample counter
(``unipred.data.accounting.COUNTER``, ``skipped/corrupt``), never fatal.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from unipred.base.extras import require
from unipred.data.accounting import COUNTER, BadSampleCounter, SkipSample
from unipred.data.book import SampleBook
from unipred.data.scan import ScanReport, list_dir, log_classes, once_each
from unipred.data.shards import ShardReader, is_shard_spec

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
FRAME_EXTS = (".jpg", ".jpeg", ".png")


def frame_indices(total: int, num_frames: int, stride: int, train: bool, rng=random) -> list:
    """Indices of ``num_frames`` frames ``stride`` apart inside a clip of ``total`` frames."""
    if total < 1:
        raise ValueError("video has no frames")
    span = (num_frames - 1) * stride + 1
    if total < span:  # short clip: spread the frames evenly over what there is
        return torch.linspace(0, total - 1, num_frames).round().long().tolist()
    start = rng.randint(0, total - span) if train else (total - span) // 2
    return list(range(start, start + span, stride))


def _require_decoder():
    # fail at construction, in one line, rather than count every clip as unreadable
    return require("torchcodec.decoders", "video", "decoding video")  # needs FFmpeg's libs


def decode_video(source, num_frames: int, stride: int, train: bool, rng=random) -> torch.Tensor:
    """A video file path or its bytes -> uint8 frames (T, C, H, W) sampled as configured."""
    empty = (
        len(source) == 0
        if isinstance(source, (bytes, bytearray))
        else not Path(source).stat().st_size
    )
    if empty:
        raise SkipSample("empty", "zero-length file")
    dec = _require_decoder().VideoDecoder(source, seek_mode="exact")
    total = dec.metadata.num_frames or len(dec)
    return dec.get_frames_at(frame_indices(total, num_frames, stride, train, rng)).data


def decode_frames(frames: list, num_frames: int, stride: int, train: bool, rng=random):
    """Pre-extracted frames (paths or encoded bytes, in time order) -> uint8 (T, C, H, W)."""
    from torchvision.io import ImageReadMode, decode_image

    idx = frame_indices(len(frames), num_frames, stride, train, rng)
    out = []
    for i in idx:
        f = frames[i]
        data = f if isinstance(f, bytes) else Path(f).read_bytes()
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out.append(decode_image(buf, mode=ImageReadMode.RGB))
    return torch.stack(out)


@dataclass
class ClipTransform:
    """uint8 (T, C, H, W) -> normalised float (C, T, H, W) of ``size`` x ``size``.

    Training: resize the short side to ``size * scale`` then a random crop (and an optional
    horizontal flip, off for direction-sensitive labels such as Something-Something);
    evaluation: resize the short side to ``size * scale`` and take the centre crop.
    """

    size: int = 224
    train: bool = False
    scale: float = 1.14  # short side before cropping, relative to size (256/224)
    hflip: bool = False
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def __call__(self, frames: torch.Tensor, rng=random) -> torch.Tensor:
        short = max(self.size, round(self.size * self.scale))
        x = TF.resize(frames, [short], antialias=True)  # (T, C, h, w), short side = `short`
        h, w = x.shape[-2:]
        if self.train:
            top, left = rng.randint(0, h - self.size), rng.randint(0, w - self.size)
        else:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        if self.train and self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        x = x.float().div_(255)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.permute(1, 0, 2, 3).contiguous()  # (T, C, H, W) -> (C, T, H, W)


def _is_frame_dir(p: Path) -> bool:
    return p.is_dir() and any(f.suffix.lower() in FRAME_EXTS for f in p.iterdir())


def _clips_in(folder: Path, report: ScanReport | None = None, root=None) -> list[Path]:
    """Video files and frame folders directly inside ``folder`` (regular files only, no link
    leaving the data root: :func:`unipred.data.scan.list_dir`)."""
    out = []
    for e in list_dir(str(folder), report, str(root or folder)):
        p = Path(e.path)
        if p.suffix.lower() in VIDEO_EXTS and e.is_file(follow_symlinks=True) or _is_frame_dir(p):
            out.append(p)
    return out


def _read_csv(path: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].startswith("#") or (i == 0 and row[0].lower() == "path"):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: line {i + 1} needs 'path,label', got {row}")
            rows.append((path.parent / row[0].strip(), row[1].strip()))
    labels = [lab for _, lab in rows]
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return [(p, int(lab)) for p, lab in rows], []
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[lab]) for p, lab in rows], classes


def list_videos(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """-> ([(clip path, label)], class names) for a folder tree or a CSV file (see module doc)."""
    root = Path(root)
    if root.suffix.lower() == ".csv" and root.is_file():
        return _read_csv(root)
    if not root.is_dir():
        raise ValueError(f"video data root {root} is neither a folder nor a CSV file")
    report = ScanReport()
    samples = [(p, -1) for p in _clips_in(root, report)]
    classes = [e.name for e in list_dir(str(root)) if e.is_dir(follow_symlinks=True)
               and not _is_frame_dir(Path(e.path))]  # fmt: skip
    for i, c in enumerate(classes):
        samples += [(p, i) for p in _clips_in(root / c, report, root)]
    samples = once_each(samples, str(root), report)  # a clip reached twice counts once
    if report.line():
        logging.getLogger(__name__).warning("%s: %s", root, report.line())
    if not samples:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTS)}) or frame folders under {root}")
    return samples, classes


def load_clip(path: Path, num_frames: int, stride: int, train: bool, rng=random) -> torch.Tensor:
    """A video file or a frame folder -> uint8 (T, C, H, W)."""
    if path.is_dir():
        frames = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_EXTS)
        return decode_frames(frames, num_frames, stride, train, rng)
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the decoder forever
        raise OSError(f"{path} is not a regular file")
    return decode_video(str(path), num_frames, stride, train, rng)


class VideoFolder(Dataset):
    """Map-style clips from ``list_videos(root)``; items are (clip (C, T, H, W), label).

    A clip that fails to decode is recorded in the reader's
    :class:`~unipred.data.book.SampleBook` (once per epoch, under one reason) and replaced by
    the next readable one, so broken files never stop an epoch; the engine stops a run only
    above ``data.max_bad_fraction``.
    """

    def __init__(
        self, root, num_frames: int, stride: int, transform: ClipTransform,
        max_retries: int = 20, counter: BadSampleCounter | None = None,
    ):  # fmt: skip
        self.samples, self.classes = list_videos(root)
        if any(not _is_frame_dir(p) for p, _ in self.samples):  # frame folders need no torchcodec
            _require_decoder()
        log_classes(str(root), [y for _, y in self.samples], self.classes, "clips")
        self.num_frames, self.stride, self.transform = num_frames, stride, transform
        # max_retries is kept for callers; a substitute is searched over the whole set
        self.max_retries, self.counter = max_retries, counter or COUNTER
        self.book = SampleBook(self.samples, str(root), self.counter)

    def __len__(self) -> int:
        return len(self.samples)

    def _fetch(self, j: int, counter):
        path, label = self.samples[j]
        try:
            clip = load_clip(path, self.num_frames, self.stride, self.transform.train)
        except Exception as err:  # any decoder failure: skip the file, never the epoch
            counter.count(_video_reason(err), str(path), err)
            return None
        return self.transform(clip), label

    def __getitem__(self, i: int):
        # a substitute is recorded when its own index comes up: each file counts once
        return self.book.first_good(i, self._fetch)


class VideoShardDataset(ShardReader):
    """Streaming clips from webdataset shards (local pattern, folder, ``pipe:`` or URL).

    Shard splitting over ranks and workers, per-epoch reshuffling and the per-rank sample
    quota are the image reader's (:class:`unipred.data.shards.ShardReader`); only the
    decoding differs. Items are (clip (C, T, H, W), label) with label -1 when absent.
    """

    def __init__(
        self, spec: str, num_frames: int, stride: int, transform: ClipTransform,
        shuffle_buffer: int = 500, seed: int = 0, num_samples: int | None = None,
        counter: BadSampleCounter | None = None,
    ):  # fmt: skip
        super().__init__(
            spec, transform, transform.train, shuffle_buffer, seed, num_samples, counter=counter
        )
        self.num_frames, self.stride = num_frames, stride

    def decode(self, sample: dict):
        """A raw sample dict -> (clip, label), or None (counted) when it cannot be read."""
        what = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        train = self.transform.train
        try:
            video = next((sample[e[1:]] for e in VIDEO_EXTS if e[1:] in sample), None)
            if video is not None:
                clip = decode_video(video, self.num_frames, self.stride, train)
            else:
                frames = [sample[k] for k in sorted(sample) if k[:1] == "f" and "." in k]
                if not frames:
                    raise ValueError(f"no video or frames in sample (keys {sorted(sample)})")
                clip = decode_frames(frames, self.num_frames, self.stride, train)
        except Exception as err:  # any decoder failure: drop the sample, never the epoch
            self.counter.count(_video_reason(err), what, err)
            return None
        label = int(sample["cls"]) if "cls" in sample else -1
        return self.transform(clip), label


def _video_reason(err: BaseException) -> str:
    """``empty`` for a video with nothing to decode (zero bytes, zero frames, no video
    stream: an audio-only file), ``corrupt`` for any other decoder failure."""
    msg = str(err)
    if isinstance(err, SkipSample):
        return err.reason
    if "no frames" in msg or "best video stream is unknown" in msg or "no video" in msg:
        return "empty"
    return "corrupt"


def video_dataset(
    spec: str, num_frames: int, stride: int, transform: ClipTransform,
    shuffle_buffer: int = 500, seed: int = 0, counter: BadSampleCounter | None = None,
):  # fmt: skip
    """The right reader for ``spec``: shards -> VideoShardDataset, else VideoFolder."""
    if not spec:
        raise ValueError("empty video data path")
    if is_shard_spec(spec):
        return VideoShardDataset(
            spec, num_frames, stride, transform, shuffle_buffer, seed, counter=counter
        )
    return VideoFolder(spec, num_frames, stride, transform, counter=counter)


def encode_frames_jpeg(frames: torch.Tensor, quality: int = 90) -> list[bytes]:
    """uint8 (T, C, H, W) -> JPEG bytes per frame (used by the packer and the tests)."""
    from torchvision.io import encode_jpeg

    return [bytes(encode_jpeg(f, quality=quality).numpy()) for f in frames]


def write_video(
    path: str | Path, frames: torch.Tensor, fps: int = 8, crf: int = 18, preset: str | None = None
) -> None:
    """uint8 (T, C, H, W) frames -> a real video file (codec chosen from the extension);
    ``preset`` (e.g. "ultrafast") trades file size for encoding speed."""
    from torchcodec.encoders import VideoEncoder

    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"write_video needs uint8 (T, 3, H, W), got {frames.dtype} {frames.shape}")
    VideoEncoder(frames, frame_rate=fps).to_file(str(path), crf=crf, preset=preset)
