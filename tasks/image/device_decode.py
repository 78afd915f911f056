"""JPEG decoding and the pretraining crop on the training device (``data.decode_on_device``).

When the CPU workers cannot decode and augment as fast as the GPU trains, the expensive part
(decoding, resizing) can move to the GPU: a DataLoader worker then only reads the JPEG header,
draws the random crop and flip exactly as the CPU pipeline does (``RandomResizedCrop`` then
``RandomHorizontalFlip``, same random calls in the same order), and passes the encoded bytes
on. The batch, an :class:`EncodedBatch`, is decoded where it is moved: ``batch.to("cuda")``
(which is what Lightning's device transfer calls) decodes every JPEG with nvJPEG through
``torchvision.io.decode_jpeg``, crops, resizes (bilinear or bicubic, antialiased like PIL),
flips and normalises on the GPU. On a CPU the same code decodes with libjpeg-turbo, which is
how the tests check it against the PIL pipeline.

What the worker cannot hand over as a JPEG (PNG, CMYK, 16-bit, palette..., or a JPEG without
its end marker, likely truncated) is decoded and converted there, through the same checks and
counts as the CPU path, and travels as pixels.
Unreadable or tiny files are skipped and counted in the worker. A JPEG the device decoder
rejects is decoded by PIL instead; if PIL fails too it is counted and replaced by another image
of its batch, so batches keep their size.
"""

from __future__ import annotations

import io
import warnings

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor
from unipred.tasks.image.decode import decode_image

from unipred.data.accounting import COUNTER, BadSampleCounter

_MODES = ("bilinear", "bicubic")  # interpolations F.interpolate shares with PIL


class EncodedImage:
    """One sample: JPEG bytes (uint8 tensor) or RGB pixels (uint8 (3, H, W)), plus its crop
    box (top, left, height, width) in source pixels and whether to flip it."""

    __slots__ = ("data", "pixels", "box", "flip", "what")

    def __init__(self, box, flip: bool, data=None, pixels=None, what: str = ""):
        self.data, self.pixels, self.box, self.flip, self.what = data, pixels, box, flip, what


class DeviceDecodeTransform:
    """The worker side of the pretraining pipeline with device decoding.

    Takes encoded bytes (``from_bytes``, what the image readers call when ``wants_bytes``) or
    a PIL image (``__call__``: synthetic data); returns an :class:`EncodedImage`.
    """

    wants_bytes = True

    @classmethod
    def from_aug(cls, aug) -> DeviceDecodeTransform:
        """From an ``ImageAugConfig``; only its crop, flip and normalisation can run here."""
        extra = [k for k in ("auto_augment", "reprob", "color_jitter", "mixup", "cutmix")
                 if getattr(aug, k)]  # fmt: skip
        if extra:
            raise ValueError(f"data.decode_on_device runs the pretraining pipeline (random "
                             f"resized crop, flip) only; data.aug sets {extra}")  # fmt: skip
        return cls(aug.img_size, aug.scale, aug.ratio, aug.hflip, aug.mean, aug.std,
                   aug.interpolation)  # fmt: skip

    def __init__(self, img_size: int, scale, ratio, hflip: float, mean, std,
                 interpolation: str = "bilinear"):  # fmt: skip
        if interpolation not in _MODES:
            raise ValueError(f"decode on device: interpolation {interpolation!r} not in "
                             f"{list(_MODES)}")  # fmt: skip
        self.size, self.scale, self.ratio = int(img_size), tuple(scale), tuple(ratio)
        self.hflip, self.mean, self.std = float(hflip), list(mean), list(std)
        self.interpolation = interpolation

    def _params(self, img: Image.Image):
        # the CPU pipeline's random calls, in its order: crop box, then the flip draw
        box = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < self.hflip)
        return box, flip

    def from_bytes(self, data: bytes, what: str = "", min_size: int = 8,
                   counter: BadSampleCounter | None = None) -> EncodedImage | None:  # fmt: skip
        """Encoded file -> EncodedImage, or None (counted) when the sample must be skipped."""
        counter = counter or COUNTER
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head = Image.open(io.BytesIO(data))  # reads the header only
        except Exception:  # header garbage of any kind: the CPU path tells why, and counts
            head = None
        # a JPEG that does not end with its EOI marker is probably truncated: the CPU decode
        # below tells (and counts) for sure, where a device decoder might pad it with grey
        whole = data.rstrip(b"\0").endswith(b"\xff\xd9")
        if head is not None and head.format == "JPEG" and head.mode in ("RGB", "L") and whole:
            if min(head.size) < min_size:
                counter.count("tiny", what)
                return None
            # a grey JPEG becomes RGB on the device, uncounted as on the CPU path (lossless)
            box, flip = self._params(head)
            return EncodedImage(box, flip, data=torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                what=what)  # fmt: skip
        img = decode_image(data, what, min_size, counter)  # converts and counts, or None
        return None if img is None else self(img, what)

    def __call__(self, img: Image.Image, what: str = "") -> EncodedImage:
        """A decoded PIL image (converted to RGB) -> EncodedImage carrying its pixels."""
        img = img.convert("RGB") if img.mode != "RGB" else img
        box, flip = self._params(img)
        return EncodedImage(box, flip, pixels=pil_to_tensor(img), what=what)

    def collate(self, samples) -> tuple[EncodedBatch, torch.Tensor]:
        """[(EncodedImage, label)] -> (EncodedBatch, labels); the batch decodes in ``.to()``."""
        items = [s[0] for s in samples]
        labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
        return EncodedBatch(items, self), labels


class EncodedBatch:
    """A batch still encoded; ``.to(device)`` returns the (B, 3, S, S) float images there.

    Deliberately not a tensor or a dataclass, so device transfers that walk a batch call its
    ``to`` instead of moving the bytes (nvJPEG reads them from host memory).
    """

    def __init__(self, items: list[EncodedImage], tf: DeviceDecodeTransform,
                 counter: BadSampleCounter | None = None):  # fmt: skip
        if not items:
            raise ValueError("empty batch")
        # None: the process-wide COUNTER, looked up where the batch is decoded (not pickled
        # along from the worker that collated it)
        self.items, self.tf, self.counter = items, tf, counter

    def __len__(self) -> int:
        return len(self.items)

    def to(self, device, non_blocking: bool = False, **_) -> torch.Tensor:
        device = torch.device(device)
        images = self._decode(device)
        ok = [i for i, im in enumerate(images) if im is not None]
        if not ok:
            raise ValueError(f"no image of this batch of {len(self)} could be decoded on "
                             f"{device}; first: {self.items[0].what or '?'}")  # fmt: skip
        S, tf = self.tf.size, self.tf
        out = torch.empty(len(self), 3, S, S, device=device)
        for i in range(len(self)):
            src = i if images[i] is not None else ok[i % len(ok)]  # counted in _decode
            top, left, h, w = self.items[src].box
            crop = images[src][:, top : top + h, left : left + w].float()
            img = F.interpolate(crop[None], size=(S, S), mode=tf.interpolation,
                                align_corners=False, antialias=True)[0]  # fmt: skip
            if tf.interpolation == "bicubic":
                img = img.clamp(0, 255)  # PIL's bicubic output is uint8, so clipped
            out[i] = img.flip(-1) if self.items[src].flip else img
        mean = torch.tensor(tf.mean, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(tf.std, device=device).view(1, 3, 1, 1) * 255
        return out.sub_(mean).div_(std)

    def _decode_on_cpu(self, it: EncodedImage, device: torch.device) -> torch.Tensor | None:
        """PIL's decode with the CPU path's checks and counts; None (counted) if unusable."""
        img = decode_image(it.data.numpy().tobytes(), it.what, 1, self.counter or COUNTER)
        return None if img is None else pil_to_tensor(img).to(device)

    def _decode(self, device: torch.device) -> list[torch.Tensor | None]:
        """uint8 (3, H, W) per item on ``device``; None (counted) where a JPEG fails."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images: list[torch.Tensor | None] = [None] * len(self)
        jpeg = [i for i, it in enumerate(self.items) if it.data is not None]
        for i, it in enumerate(self.items):
            if it.pixels is not None:
                images[i] = it.pixels.to(device)
        if not jpeg:
            return images
        kw = {"mode": ImageReadMode.RGB, "device": device}
        try:  # one batched call: nvJPEG's fast path
            for i, im in zip(jpeg, decode_jpeg([self.items[i].data for i in jpeg], **kw)):
                images[i] = im
        except Exception:  # some file is bad: find which, one by one
            for i in jpeg:
                try:
                    images[i] = decode_jpeg(self.items[i].data, **kw)
                except Exception:  # e.g. a JPEG flavour the device decoder lacks: PIL decides
                    images[i] = self._decode_on_cpu(self.items[i], device)
        for i in jpeg:  # a decoder that returns a short image is as bad as one that raises
            im = images[i]
            top, left, h, w = self.items[i].box
            if im is not None and (im.shape[-2] < top + h or im.shape[-1] < left + w):
                (self.counter or COUNTER).count("corrupt", self.items[i].what)
                images[i] = None
        return images
