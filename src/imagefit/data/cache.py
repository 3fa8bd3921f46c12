"""The decode-once image cache: every image decoded, converted and resized exactly once, kept
as uint8 (N, size, size, C) in a memory-mapped file that later epochs, folds and runs read.

The cache key is the file list with sizes and modification times plus the settings, so a
changed file or setting gives a new cache. A build streams into the memmap in chunks and
records its progress; an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ..errors import ImagefitError, ImagefitWarning

CACHE_FORMAT = 1
CHUNK = 256
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


@dataclass
class ImageCache:
    """Decoded images, their original (width, height) and the rows that could not be read."""

    images: np.ndarray
    original_sizes: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    built_seconds: float = 0.0  # decoding the images into the cache in this process

    def __len__(self) -> int:
        return len(self.images)

    @property
    def failed(self) -> list[int]:
        return sorted(self.errors)

    def tensor(self) -> torch.Tensor:
        """The images as a uint8 (N, H, W, C) tensor sharing the cache's memory."""
        return torch.from_numpy(self.images)


def default_cache_root() -> Path:
    base = os.environ.get("IMAGEFIT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "imagefit" / "images"


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


def _try_decode(path: str, settings: CacheSettings):
    try:
        return decode_image(path, settings)
    except DECODE_ERRORS as error:
        return None, f"{type(error).__name__}: {error}".splitlines()[0]


# -- building -----------------------------------------------------------------------------


def cache_key(paths: list[str], settings: CacheSettings) -> str:
    """Hash of the file list with sizes and modification times, and the settings."""
    digest = hashlib.sha1(json.dumps([CACHE_FORMAT, asdict(settings)]).encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            raise ImagefitError(f"{path} disappeared: restore it or remove it from the data") \
                from None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def build_cache(
    paths: list[str],
    settings: CacheSettings,
    root: str | Path | None = None,
    *,
    strict: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> ImageCache:
    """Decode ``paths`` once into a memory-mapped cache, or open the cache built before.

    Unreadable files are recorded in ``errors`` (and warned about by the caller), or raise an
    ``ImagefitError`` with ``strict``.
    """
    root = Path(root) if root else default_cache_root()
    folder = root / cache_key(paths, settings)
    shape = (len(paths), settings.size, settings.size, settings.channels)
    meta_path, progress_path = folder / "meta.json", folder / "progress.json"
    images_path, sizes_path = folder / "images.u8", folder / "sizes.i32"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return _open(images_path, sizes_path, shape, meta["errors"], strict, paths)

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    state = json.loads(progress_path.read_text()) if progress_path.is_file() else {
        "done": 0, "errors": {}
    }
    mode = "r+" if state["done"] and images_path.is_file() else "w+"
    images = np.memmap(images_path, dtype=np.uint8, mode=mode, shape=shape)
    sizes = np.memmap(sizes_path, dtype=np.int32, mode=mode, shape=(len(paths), 2))
    errors: dict[str, str] = state["errors"]
    start = state["done"]
    bar = tqdm(total=len(paths), initial=start, desc="caching images", unit="img",
               disable=None if progress and len(paths) - start >= CHUNK else True,
               leave=False)
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for begin in range(start, len(paths), CHUNK):
            chunk = paths[begin:begin + CHUNK]
            for offset, (array, info) in enumerate(pool.map(
                    lambda p: _try_decode(p, settings), chunk)):
                row = begin + offset
                if array is None:
                    if strict:
                        raise _unreadable(paths[row], info)
                    errors[str(row)] = info
                    continue
                images[row] = array
                sizes[row] = info
            images.flush()
            sizes.flush()
            _write_json(progress_path, {"done": begin + len(chunk), "errors": errors})
            bar.update(len(chunk))
    bar.close()
    _write_json(meta_path, {"shape": list(shape), "settings": asdict(settings),
                            "errors": errors, "count": len(paths)})
    progress_path.unlink(missing_ok=True)
    del images, sizes
    cache = _open(images_path, sizes_path, shape, errors, strict, paths)
    cache.built_seconds = time.perf_counter() - started
    return cache


def _unreadable(path: str, reason: str) -> ImagefitError:
    return ImagefitError(f"{path} is not a readable image ({reason}): fix or remove it, or "
                         "leave out --strict to skip such files")


def _open(images_path, sizes_path, shape, errors, strict, paths) -> ImageCache:
    errors = {int(k): v for k, v in errors.items()}
    if strict and errors:
        row = min(errors)
        raise _unreadable(paths[row], errors[row])
    images = np.memmap(images_path, dtype=np.uint8, mode="c", shape=shape)
    sizes = np.array(np.memmap(sizes_path, dtype=np.int32, mode="r", shape=(shape[0], 2)))
    return ImageCache(images=images, original_sizes=sizes, errors=errors)


def warn_unreadable(cache: ImageCache, paths: list[str]) -> None:
    """One warning that lists the unreadable files and their count."""
    if not cache.errors:
        return
    shown = "; ".join(f"{paths[r]} ({cache.errors[r]})" for r in cache.failed[:5])
    more = f" and {len(cache.errors) - 5} more" if len(cache.errors) > 5 else ""
    warnings.warn(
        f"skipped {len(cache.errors)} unreadable file(s): {shown}{more} "
        "(use --strict to stop instead)", ImagefitWarning, stacklevel=2
    )


# -- in-memory arrays ---------------------------------------------------------------------


def cache_arrays(arrays: np.ndarray, settings: CacheSettings) -> ImageCache:
    """Arrays already decoded (uint8 N,H,W,C) brought to the cache's size and channels."""
    n, height, width, channels = arrays.shape
    images = arrays
    if channels != settings.channels:
        if settings.channels == 3:
            images = np.repeat(images, 3, axis=3)
        else:
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
            images = np.round(images.astype(np.float32) @ weights)[..., None].astype(np.uint8)
    if (height, width) != (settings.size, settings.size):
        images = np.concatenate([
            _resize_batch(images[i:i + 1024], settings) for i in range(0, n, 1024)
        ]) if n else images.reshape(0, settings.size, settings.size, settings.channels)
    sizes = np.tile(np.array([width, height], dtype=np.int32), (n, 1))
    return ImageCache(images=np.ascontiguousarray(images), original_sizes=sizes)


def _resize_batch(images: np.ndarray, settings: CacheSettings) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    height, width = x.shape[-2:]
    size = settings.size
    if settings.resize == "crop" and height != width:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = x[..., top:top + side, left:left + side]
    if settings.resize == "pad" and height != width:
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        x = F.pad(x, (left, side - width - left, top, side - height - top))
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
