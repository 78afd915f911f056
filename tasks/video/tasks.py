"""Video data: NEPA pretraining on clips and clip classification (fine-tune, linear probe,
eval), the generic objectives of unipred.task on the ``video`` data source.

Data (``data.root`` / ``data.val_root``): webdataset shards from ``unipred data pack-video``,
a folder of class sub-folders holding videos or frame folders, or a ``path,label`` CSV (see
``unipred.tasks.video.data``). Empty ``data.root`` means generated moving-shape clips (the class is
the direction of motion), so every task runs with no data on disk.

Model sizes registered here (the tubelet tokenizer on the image sizes' predictors):
``nepa_video_b16`` / ``nepa_video_b16_cls`` (VideoMAE's 2x16x16 tubelets), ``nepa_video_s16``
and ``nepa_video_debug`` (2x4x4 tubelets, for tests and the demo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from unipred.tasks.video.data import ClipTransform, video_dataset

from unipred.base.registry import MODELS
from unipred.nn.model import ModelConfig, model_config
from unipred.task import (
    DataConfig,
    DataSource,
    check_patch,
    check_tokenizer,
    model_tokenizer,
    register_data,
)

DIRECTIONS = ("right", "left", "down", "up", "down-right", "up-left", "down-left", "up-right")
_STEP = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0), "down-right": (1, 1),
         "up-left": (-1, -1), "down-left": (1, -1), "up-right": (-1, 1)}  # fmt: skip


# ------------------------------------------------------------------------------ model sizes
def _video(base: str, patch: int, tubelet: int = 2, **over) -> ModelConfig:
    cfg = model_config(base, tokenizer="video", **over)
    cfg.tokenizer_args = {"patch_size": patch, "tubelet_size": tubelet}
    return cfg


@MODELS.register("nepa_video_b16")
def nepa_video_b16() -> ModelConfig:
    """Video, 2x16x16 tubelets: dim 768, depth 12, 12 heads (ViT-B), causal."""
    return _video("nepa_vit_b14", 16)


@MODELS.register("nepa_video_b16_cls")
def nepa_video_b16_cls() -> ModelConfig:
    """Video, 2x16x16 tubelets, fine-tune config: ViT-B, bidirectional, mean head."""
    return _video("nepa_vit_b14_cls", 16)


@MODELS.register("nepa_video_s16")
def nepa_video_s16() -> ModelConfig:
    """Video, 2x16x16 tubelets: dim 384, depth 12, 6 heads (ViT-S), causal."""
    return _video("nepa_vit_s14", 16)


@MODELS.register("nepa_video_debug")
def nepa_video_debug() -> ModelConfig:
    """Video, 2x4x4 tubelets: dim 64, depth 2, 4 heads (tests and smoke runs)."""
    return _video("nepa_debug", 4)


# ------------------------------------------------------------------------ generated clips
def moving_shape_clip(seed: int, label: int, size: int = 32, frames: int = 16, with_mask=False):
    """A shape moving in direction ``DIRECTIONS[label]`` -> uint8 frames (T, 3, size, size);
    with ``with_mask`` also its per-pixel labels (T, size, size): 0 background, 1 the static
    distractor blob, 2 the moving shape (telling the two apart takes motion).

    Shape, colour, speed, start and a static textured background are drawn from ``seed``;
    a static distractor blob makes the first frame alone useless for the label.
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: float(torch.empty(()).uniform_(lo, hi, generator=g))  # noqa: E731
    r = u(0.12, 0.2) * size
    dy, dx = _STEP[DIRECTIONS[label]]
    speed = u(0.5, 1.0) * (size - 2 * r) / max(frames - 1, 1) / max(abs(dy), abs(dx), 1)
    travel = speed * (frames - 1)

    def start(step: int) -> float:  # so that the whole path stays inside the frame
        if step == 0:
            return u(r, size - r)
        off = r + u(0, size - 2 * r - travel)
        return off if step > 0 else size - off

    y0, x0 = start(dy), start(dx)
    kind = int(torch.randint(3, (), generator=g))
    bg = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.1 * torch.rand(3, size, size, generator=g)
    fg = 0.55 + 0.45 * torch.rand(3, 1, 1, generator=g)
    blob = torch.rand(2, generator=g) * size
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    still = (yy - blob[0]) ** 2 + (xx - blob[1]) ** 2 < (r * 0.8) ** 2
    bg = torch.where(still, 1 - fg, bg)
    t = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1)
    ay = (yy - (y0 + dy * speed * t)).abs()  # (T, H, W) distance to the moving centre
    ax = (xx - (x0 + dx * speed * t)).abs()
    mask = [(ay < r) & (ax < r), ay**2 + ax**2 < r**2, (ay + ax) < r * 1.3][kind]
    out = torch.where(mask.unsqueeze(1), fg.unsqueeze(0), bg.unsqueeze(0))  # (T, 3, H, W)
    out = (out.clamp(0, 1) * 255).round().to(torch.uint8)
    if not with_mask:
        return out
    return out, torch.where(mask, 2, still.long().expand_as(mask))


class MovingShapes(torch.utils.data.Dataset):
    """Map-style generated clips: item i is (clip (C, T, H, W), direction label), from seed + i;
    with ``dense``, (clip, per-pixel labels (T, H, W): background, static blob, moving shape) (the transform must keep the
    geometry: no resize or crop)."""

    def __init__(self, length, size, frames, classes, transform: ClipTransform, seed=0,
                 dense=False):  # fmt: skip
        self.length, self.size, self.frames, self.classes = length, size, frames, classes
        self.transform, self.seed, self.dense = transform, seed, dense

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        label = i % self.classes
        seed = self.seed * 1_000_003 + i
        if self.dense:
            clip, mask = moving_shape_clip(seed, label, self.size, self.frames, with_mask=True)
            return self.transform(clip), mask
        return self.transform(moving_shape_clip(seed, label, self.size, self.frames)), label


# ------------------------------------------------------------------------------ data config
@dataclass
class VideoData(DataConfig):
    """Clip sampling and augmentation (shared by pretraining and classification)."""

    num_frames: int = 16  # frames per clip (a multiple of the tubelet size)
    frame_stride: int = 4  # take every n-th frame
    image_size: int = 224  # square crop side (a multiple of the patch size)
    resize_scale: float = 1.14  # short side resized to image_size * this before cropping
    hflip: bool = False  # random horizontal flip when training (wrong for direction labels)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = 4
    shuffle_buffer: int = 500
    # generated clips when root is "": counts and number of directions (2, 4 or 8)
    train_samples: int = 512
    val_samples: int = 128
    generated_classes: int = 4


def _transform(d: VideoData, train: bool) -> ClipTransform:
    return ClipTransform(d.image_size, train, d.resize_scale, d.hflip, tuple(d.mean), tuple(d.std))


KNOWN_TOKENIZERS = ("image", "audio", "video")  # a plugin's tokenizer is not judged


def check_video_config(cfg) -> None:
    """Shape mistakes of a video config: tokenizer kind, crop vs patch, frames vs tubelet,
    normalisation vs channels (one line each, before anything is built)."""
    d = cfg.data
    name, args = model_tokenizer(cfg)
    check_tokenizer(name, "video", cfg.model.name, KNOWN_TOKENIZERS)
    if name != "video":
        return
    check_patch(d.image_size, args.get("patch_size", 16), "data.image_size")
    tube = int(args.get("tubelet_size", 2))
    if d.num_frames < tube or d.num_frames % tube:
        raise ValueError(
            f"data.num_frames={d.num_frames} is not a multiple of the tubelet size {tube} "
            "(model.tokenizer_args.tubelet_size)"
        )
    chans = int(args.get("in_chans", 3))
    for key in ("mean", "std"):
        if len(getattr(d, key)) != chans:
            raise ValueError(
                f"data.{key} has {len(getattr(d, key))} values but the model takes "
                f"in_chans={chans} (model.tokenizer_args.in_chans)"
            )


def build_video_dataset(cfg, split: str, augment: bool | None = None, dense: bool = False):
    """The train or val dataset of a video task config (generated when data.root is "").
    ``augment`` (default: the split is "train") picks random or centred sampling and crops;
    ``dense``: generated clips with per-pixel labels (segmentation)."""
    d: VideoData = cfg.data
    train = split == "train"
    aug = train if augment is None else augment
    root = d.root if train else d.val_root
    if not d.root:  # generated data; different seeds per split so val clips are unseen
        n = d.train_samples if train else d.val_samples
        if n <= 0:
            return None
        seed = cfg.seed + (0 if train else 7919)
        if dense:  # per-pixel labels: no resize or crop, normalisation only
            tf = ClipTransform(d.image_size, False, 1.0, False, tuple(d.mean), tuple(d.std))
            return MovingShapes(n, d.image_size, d.num_frames, d.generated_classes, tf, seed, True)
        return MovingShapes(n, d.image_size, d.num_frames, d.generated_classes,
                            _transform(d, False), seed)  # fmt: skip
    if not root:
        return None
    return video_dataset(root, d.num_frames, d.frame_stride, _transform(d, aug),
                         d.shuffle_buffer, cfg.seed)  # fmt: skip


_SMOKE = {"model.name": "nepa_video_debug", "trainer.global_batch": 4, "data.image_size": 8,
          "data.num_frames": 4, "data.train_samples": 8, "data.val_samples": 4,
          "data.num_workers": 0}  # fmt: skip


@register_data("video", objectives=("pretrain", "classify", "segment"))
class VideoClips(DataSource):
    """Video clips from shards, class folders or a CSV (generated moving shapes if no root);
    segmentation: generated clips, a label per pixel of every frame (background, static blob,
    moving shape)."""

    config = VideoData
    smoke = _SMOKE

    @classmethod
    def check_config(cls, cfg, objective):
        check_video_config(cfg)
        if objective == "segment" and cfg.data.root:
            raise ValueError(
                "data.root: video segmentation reads generated clips only (data.root empty); "
                "for labelled videos of your own write a data source (docs/adding-a-modality.md)"
            )

    def num_classes(self):
        if self.objective == "segment":
            return 3  # background, static blob, moving shape
        return None if self.cfg.data.root else self.cfg.data.generated_classes

    def build(self, split, augment):
        return build_video_dataset(self.cfg, split, augment, dense=self.objective == "segment")


VideoPretrain = VideoClips.tasks["pretrain"]
VideoClassify = VideoClips.tasks["classify"]
VideoSegment = VideoClips.tasks["segment"]
