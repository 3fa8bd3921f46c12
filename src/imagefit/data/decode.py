"""Reading one image as the cache stores it: decoded once (JPEGs at a reduced scale when
much larger than needed), turned by its EXIF orientation, converted to the channels and made
square by the settings' way (crop, squish or pad); and the settings chosen from a sample of
the images when not given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PROBE_COUNT = 256
MAX_AUTO_SIZE = 224
EXIF_ORIENTATION = 0x0112
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                 Image.DecompressionBombError)


@dataclass(frozen=True)
class CacheSettings:
    """How images are stored: square side, channels and the way they are made square."""

    size: int
    channels: Literal[1, 3]
    resize: Literal["crop", "squish", "pad"] = "crop"


# -- choosing settings --------------------------------------------------------------------


def probe_images(paths: list[str], seed: int = 0) -> tuple[int | None, bool]:
    """From the headers of up to 256 files: the median short side and whether all are grey."""
    rng = np.random.default_rng(seed)
    chosen = paths if len(paths) <= PROBE_COUNT else [
        paths[i] for i in rng.choice(len(paths), PROBE_COUNT, replace=False)
    ]
    sides, grey = [], True
    for path in chosen:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
                grey = grey and img.mode in GREY_MODES
        except DECODE_ERRORS:
            continue
    return (int(np.median(sides)) if sides else None), grey


def auto_size(short_side: int) -> int:
    """The images' typical short side, at most 224."""
    return min(short_side, MAX_AUTO_SIZE)


# -- decoding -----------------------------------------------------------------------------


def _to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (16-bit, float, palette, alpha, CMYK) to 'L' or 'RGB'."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            low, high = values.min(), values.max()
            values = (values - low) / (high - low or 1.0) * 255.0
        elif values.max() > 255:
            values = values / 257.0  # 16-bit range to 8-bit
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("L" if channels == 1 else "RGB")


def _resized(img: Image.Image, settings: CacheSettings) -> Image.Image:
    size = settings.size
    width, height = img.size
    if (width, height) == (size, size):
        return img
    bilinear = Image.Resampling.BILINEAR
    if settings.resize == "squish":
        return img.resize((size, size), bilinear, reducing_gap=3.0)
    if settings.resize == "crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return img.resize((size, size), bilinear, box=(left, top, left + side, top + side),
                          reducing_gap=3.0)
    scale = size / max(width, height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new(img.mode, (size, size))
    canvas.paste(img.resize(inner, bilinear, reducing_gap=3.0),
                 ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return canvas


def decode_image(path: str, settings: CacheSettings) -> tuple[np.ndarray, tuple[int, int]]:
    """One file as uint8 (size, size, C) and its original (width, height)."""
    with Image.open(path) as img:
        width, height = img.size
        turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        original = (height, width) if turned else (width, height)
        if img.format == "JPEG":
            # Decode at a reduced scale when the file is much larger than needed.
            scale = settings.size / (min(width, height) if settings.resize == "crop"
                                     else max(width, height))
            img.draft("L" if settings.channels == 1 else "RGB",
                      (max(1, int(width * scale)), max(1, int(height * scale))))
        img = ImageOps.exif_transpose(img)
        img = _resized(_to_channels(img, settings.channels), settings)
        array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return array, original
