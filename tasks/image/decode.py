"""Image decoding that never fails a run: bytes -> 8-bit RGB PIL image, or a counted skip.

The image modality's own bad-sample reasons (conversions that change an image's content) are
registered here; the generic ones (corrupt, truncated, tiny, too_large, ...) are the core's
(``unipred.data.accounting``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from unipred.data.accounting import COUNTER, BadSampleCounter, register_reasons

register_reasons(
    converted=("color_to_gray", "cmyk", "high_bit_depth", "palette_or_alpha", "other_mode")
)

# images whose header claims more pixels than this are skipped before decoding (a
# decompression bomb: a few bytes that would decode to gigabytes); PIL's own check only warns
# below twice its limit, this one refuses at its limit
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def decode_image(
    data: bytes,
    what: str = "",
    min_size: int = 8,
    counter: BadSampleCounter | None = None,
) -> Image.Image | None:
    """Bytes -> an 8-bit RGB PIL image, or None if the sample must be skipped.

    Skipped (and counted): not an image, truncated data, either side < ``min_size`` px, a
    header claiming more than ``MAX_PIXELS`` pixels (judged before decoding).
    Converted (and counted): CMYK, 16-bit / float, palette or alpha images. Grayscale is
    replicated to RGB without being counted (nothing about the image changes).
    Truncated files are never padded with grey (PIL's LOAD_TRUNCATED_IMAGES stays off).
    """
    counter = counter or COUNTER
    if not data:  # a zero-byte file (a sync cut short): "empty", as for every modality
        counter.count("empty", what)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", palette transparency
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w * h > MAX_PIXELS:
                counter.count("too_large", what, ValueError(f"header claims {w}x{h} pixels"))
                return None
            img.load()
    except Image.DecompressionBombError as e:  # PIL refuses > 2 x its limit while opening
        counter.count("too_large", what, e)
        return None
    except UnidentifiedImageError as e:
        counter.count("corrupt", what, e)
        return None
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
        counter.count(reason, what, e)
        return None
    except Exception as e:  # decoders raise many types on garbage; never fatal
        counter.count("corrupt", what, e)
        return None
    if min(img.size) < min_size:
        counter.count("tiny", what)
        return None
    return to_rgb(img, what, counter)


def to_rgb(img: Image.Image, what: str = "", counter: BadSampleCounter | None = None):
    """Convert any PIL mode to 8-bit RGB, counting the conversions that change the content."""
    counter = counter or COUNTER
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1"):  # lossless: three equal channels, not a "problem"
        return img.convert("RGB")
    if mode == "CMYK":
        counter.count("cmyk", what)
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        counter.count("high_bit_depth", what)
        return _high_bit_to_rgb(img)
    if mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        counter.count("palette_or_alpha", what)
        rgba = img.convert("RGBA")
        # alpha is composited on white: converting straight to RGB would expose whatever
        # colour the transparent pixels happen to hold
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    counter.count("other_mode", what)
    return img.convert("RGB")


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit int / float grayscale -> 8-bit RGB by scaling, not clipping.

    PIL's own ``convert("RGB")`` clips values above 255, which turns most 16-bit images
    white; here the full 16-bit range (or [0, 1] for float images) maps to [0, 255].
    """
    a = np.asarray(img)
    if a.dtype.kind == "f":
        hi = 1.0 if float(np.nanmax(a)) <= 1.0 else 255.0
        a8 = np.clip(np.nan_to_num(a) / hi * 255.0, 0, 255).astype(np.uint8)
    else:
        # "I;16*" is 16-bit by definition; plain "I" (32-bit) is judged by its values
        sixteen = img.mode.startswith("I;16") or int(a.max(initial=0)) > 255
        hi = 65535 if sixteen else 255
        a8 = np.clip(a.astype(np.int64) * 255 // hi, 0, 255).astype(np.uint8)
    if a8.ndim == 3:
        a8 = a8[..., 0]
    return Image.fromarray(a8, mode="L").convert("RGB")
