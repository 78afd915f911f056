"""Config-time checks of the image tasks: shape mistakes fail before anything is built.

``check_image_config`` is what ``ImagePretrain.check_config`` / ``ImageClassify.check_config``
run (``unipred.train.config.load_config`` calls them, also under ``--print-config``). It checks the
tokenizer kind, image size vs patch size, ``in_chans`` vs the normalisation and vs the data
(one file is opened), and the number of classes vs the classes found in the data. Each problem
is one ``ValueError`` line naming the keys to change.

``ToChannels`` gives the model the channels it takes: grey images stay grey for ``in_chans: 1``
(a colour image is greyed and counted as ``converted/color_to_gray``), and anything reaches an
RGB model as RGB (grey replicated, not counted: nothing about the image changed).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from functools import lru_cache

import numpy as np
from PIL import Image

from unipred.data.accounting import note
from unipred.task import check_patch, model_tokenizer
from unipred.task import check_tokenizer as _check_tokenizer

# the tokenizers of the three modality folders; a plugin's tokenizer is not judged
KNOWN_TOKENIZERS = ("image", "audio", "video")


def check_tokenizer(tokenizer: str, want: str, model_name: str) -> None:
    """The task's modality vs the model's tokenizer (only the three known kinds are judged)."""
    _check_tokenizer(tokenizer, want, model_name, KNOWN_TOKENIZERS)


def model_shape(cfg) -> tuple[str, object, int]:
    """(tokenizer name, patch size, in_chans) of the config's model (the image tokenizer's
    defaults where the args leave them out)."""
    name, args = model_tokenizer(cfg)
    return name, args.get("patch_size", 14), int(args.get("in_chans", 3))


__all__ = ["check_patch", "check_tokenizer", "model_shape"]

GREY_MODES = ("L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "LA", "La")


def channel_stats(values: list[float], channels: int, key: str) -> list[float]:
    """Per-channel mean/std for ``channels``: 3 equal values serve a grey model, 1 value an
    RGB model; anything else of the wrong length is an error naming the key."""
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    if channels == 1 and len(set(values)) == 1:
        return [values[0]]
    raise ValueError(
        f"{key} has {len(values)} values but the model takes in_chans={channels} "
        f"(model.tokenizer_args.in_chans); give {channels} value(s)"
    )


# ------------------------------------------------------------------------- data peeks
def _is_image(name: str) -> bool:
    from unipred.tasks.image.data import is_image_file

    return is_image_file(name)


def first_image(spec: str) -> tuple[str, bytes] | None:
    """(name, bytes) of one image of a local folder tree, flat folder or tar shards; None
    when the data is remote, absent or holds no image where it was looked for."""
    if not spec or spec.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
        return None
    tar = None
    if spec.endswith(".tar") and os.path.isfile(spec):
        tar = spec
    elif os.path.isdir(spec):
        tars = sorted(f for f in os.listdir(spec) if f.endswith(".tar"))
        tar = os.path.join(spec, tars[0]) if tars else None
        if tar is None:
            return _first_image_file(spec)
    if tar is None:
        return None
    try:
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.isfile() and _is_image(m.name):
                    return f"{tar}:{m.name}", tf.extractfile(m).read()
    except (OSError, tarfile.TarError):
        return None  # the reader names and counts unreadable shards
    return None


def _first_image_file(root: str) -> tuple[str, bytes] | None:
    """The first image of a folder tree, by the readers' rules (unipred.data.scan): no
    folder entered twice (a symlink loop), no link out of the folder unless asked, and only
    a regular file opened (a FIFO named .png would block)."""
    from unipred.data.scan import read_regular, symlink_allowed

    seen = set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and symlink_allowed(os.path.join(dirpath, d), root))  # fmt: skip
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            if _is_image(f) and symlink_allowed(path, root):
                try:
                    return path, read_regular(path)
                except OSError:
                    continue  # not a regular file, or unreadable: the reader's business
    return None


def is_grey(img: Image.Image) -> bool:
    """True for single-channel modes and for RGB images whose three channels are equal."""
    if img.mode in GREY_MODES:
        return True
    if img.mode != "RGB":
        return False
    a = np.asarray(img)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def check_channels(spec: str, channels: int, key: str = "data.root") -> None:
    """A local folder without images, or a colour image in the data of a one-channel model,
    is a mistake (one file is opened)."""
    found = first_image(spec)
    if found is None:
        local = bool(spec) and os.path.isdir(spec)
        if local and not any(f.endswith(".tar") for f in os.listdir(spec)):
            from unipred.tasks.image.data import IMAGE_EXTENSIONS

            raise ValueError(
                f"{key}: {spec} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                "is it the right folder (audio and video have their own tasks)?"
            )
        return
    if channels != 1:
        return
    name, data = found
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        return  # a bad file is the reader's business (skipped and counted)
    if not is_grey(img):
        raise ValueError(
            f"{key}: {name} is a colour ({img.mode}) image but the model takes in_chans=1; "
            "set model.tokenizer_args.in_chans=3, or convert the data to grey"
        )


@lru_cache(maxsize=16)
def classes_in(spec: str, label_file: str = "", classes_file: str = "") -> int | None:
    """Number of classes a local training set holds (class folders, the shards' meta.json,
    a classes file or the labels of a label file); None when it cannot be told cheaply."""
    if classes_file and os.path.isfile(classes_file):
        with open(classes_file) as f:
            return sum(1 for ln in f if ln.strip())
    if label_file and os.path.isfile(label_file):
        from unipred.tasks.image.data import read_label_file

        labels = set(read_label_file(label_file).values())
        ints = [int(v) for v in labels if v.isdigit()]
        return max(ints) + 1 if ints and len(ints) == len(labels) else len(labels)
    if not spec or not os.path.isdir(spec):
        return None
    if any(f.endswith(".tar") for f in os.listdir(spec)):
        meta = os.path.join(spec, "meta.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                return len(json.load(f).get("classes", [])) or None
        return None
    n = sum(1 for e in os.scandir(spec) if e.is_dir() and not e.name.startswith("."))
    return n or None


# ----------------------------------------------------------------- sizes from the data
def _note_explicit_size(d) -> None:
    """An explicit ``data.aug.img_size`` that differs from the side of small data (at most
    twice the size: digits, icons, tiles) resizes every image: said in one line, with the
    image it was read from. Photos far larger than the crop (ImageNet's) are cropped and
    resized by design and get no line."""
    found = (first_image(d.root) or first_image(d.val_root)) if (d.root or d.val_root) else None
    if found is None:
        return
    try:
        img = Image.open(io.BytesIO(found[1]))
    except Exception:  # noqa: BLE001 - the reader counts unreadable files itself
        return
    if max(img.size) != d.aug.img_size and max(img.size) <= 2 * d.aug.img_size:
        logging.getLogger(__name__).warning(
            "data.aug.img_size=%d: %s is %dx%d, so images are resized to %d px "
            "(data.aug.img_size=0 keeps the data's side)",
            d.aug.img_size, found[0], img.size[0], img.size[1], d.aug.img_size,
        )  # fmt: skip


def resolve_from_data(cfg, patch) -> list[str]:
    """``data.aug.img_size: 0`` and ``model.tokenizer_args.in_chans: 0`` mean "as the data":
    the side of the first image of ``data.root`` (else ``data.val_root``), rounded to the
    nearest multiple of the patch, and 1 channel for a grey image, 3 for colour. Sets them in
    ``cfg`` and returns what it set ("key=value (why)"); a value that cannot be read is one
    error line naming the key to set instead."""
    d, args = cfg.data, cfg.model.tokenizer_args
    want_size, want_chans = d.aug.img_size == 0, args.get("in_chans", 3) == 0
    if not want_size:
        _note_explicit_size(d)
    if not (want_size or want_chans):
        return []
    pairs = (("data.aug.img_size", want_size), ("model.tokenizer_args.in_chans", want_chans))
    keys = " and ".join(k for k, on in pairs if on)
    found = first_image(d.root) or first_image(d.val_root)
    if found is None and not (d.root or d.val_root):
        return []  # no data named yet (--help, a recipe read alone): building will refuse it
    if found is None:
        check_channels(d.root, 3, "data.root")  # a local folder without images: that message
        where = d.root or d.val_root
        raise ValueError(
            f"{keys}=0 (from the data): no local image found in {where!r} to read it "
            f"from; set {keys}"
        )
    name, data = found
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        raise ValueError(f"{keys}=0 (from the data): cannot read {name}; set {keys}") from None
    set_ = []
    if want_size:
        p = patch if isinstance(patch, int) else patch[0]
        side = max(img.size)
        d.aug.img_size = max(p, p * round(side / p))
        set_.append(f"data.aug.img_size={d.aug.img_size} ({name} is {img.size[0]}x{img.size[1]})")
        if d.aug.img_size != side:  # the patch does not divide the data's side: say so
            logging.getLogger(__name__).warning(
                "data.aug.img_size=%d: %s is %dx%d and the patch is %d, so images are resized "
                "to %d px; set data.aug.img_size or the patch size to change it",
                d.aug.img_size, name, img.size[0], img.size[1], p, d.aug.img_size,
            )  # fmt: skip
    if want_chans:
        args["in_chans"] = 1 if is_grey(img) else 3
        kind = "grey" if args["in_chans"] == 1 else f"colour ({img.mode})"
        set_.append(f"model.tokenizer_args.in_chans={args['in_chans']} ({name} is {kind})")
    return set_


# --------------------------------------------------------------------------- channels
class ToChannels:
    """PIL image (RGB from the reader) -> the mode a ``channels``-input model takes."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.channels == 3:
            return img if img.mode == "RGB" else img.convert("RGB")
        if img.mode == "L":
            return img
        if not is_grey(img):
            # the colour is lost: the content changed. Counted for the sample being read
            # (named, once; never for a substitute)
            note("color_to_gray")
        return img.convert("L")

    def __repr__(self) -> str:
        return f"ToChannels({self.channels})"
