"""From a table to images ready for loading: cache settings, the cache itself, usable rows and
normalization statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import distributed
from ..errors import ImagefitError
from .cache import (
    STRICT_REMEDY,
    ImageCache,
    build_cache,
    cache_arrays,
    warn_unreadable,
)
from .decode import CacheSettings, auto_size, probe_images
from .table import Table

STATS_MAX_IMAGES = 10_000
STATS_CHUNK_BYTES = 256 << 20  # float64 pixels summed at once (1,000 RGB 512 px images: 6.3 GB)


def resolve_settings(
    table: Table, image_size: int | None, channels: int | None, resize: str, seed: int = 0
) -> CacheSettings:
    """Fill in the size and channels a user left to imagefit, from the images themselves."""
    if table.arrays is not None:
        typical = min(table.arrays.shape[1:3])
        grey = table.arrays.shape[3] == 1
    else:
        typical, grey = probe_images(table.paths, seed)
        if typical is None and image_size is None:
            raise ImagefitError(
                f"none of the files of {table.description} sampled is a readable image (one "
                f"of them: {table.paths[0]}): fix or replace the files"
            )
    return CacheSettings(
        size=image_size or auto_size(typical),
        channels=channels or (1 if grey else 3),
        resize=resize,
    )


@dataclass
class PreparedImages:
    """The cache of a table's images and which of its rows can be used."""

    cache: ImageCache
    usable: np.ndarray

    def rows(self, table: Table, split: str) -> np.ndarray:
        return np.flatnonzero((table.split == split) & self.usable)


def prepare_images(
    table: Table,
    settings: CacheSettings,
    *,
    cache_dir: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
    rows: np.ndarray | None = None,
) -> PreparedImages:
    """Decode (once) and cache the table's images; warn about and set aside unreadable ones.

    ``rows``: this rank's share of the rows (sharded data): only those files are decoded, and
    the ranks then tell each other which of theirs could not be read, their original sizes
    and their digests, so every rank knows them for all rows. Arrays given in memory are
    whole on every rank already, and cached whole."""
    if table.arrays is not None:
        cache = cache_arrays(table.arrays, settings)
    else:
        cache = build_cache(table.paths, settings, cache_dir, strict=strict, progress=progress,
                            description=table.description, rows=rows)
        if rows is not None:
            _share_what_shards_found(cache)
        warn_unreadable(cache, table.paths, STRICT_REMEDY)
    usable = np.ones(len(table), dtype=bool)
    usable[cache.failed] = False
    return PreparedImages(cache=cache, usable=usable)


def _share_what_shards_found(cache: ImageCache) -> None:
    """Each rank's unreadable rows, original sizes and pixel digests of the rows it holds,
    made known to every rank for every row (the checks and the report read them)."""
    found = distributed.gather_objects((cache.held, cache.original_sizes,
                                        np.asarray(cache.hashes), cache.errors))
    sizes = np.zeros((len(cache), 2), dtype=cache.original_sizes.dtype)
    hashes = np.zeros((len(cache), cache.hashes.shape[1]), dtype=np.uint8)
    errors: dict[int, str] = {}
    for rows, their_sizes, their_hashes, their_errors in found:
        sizes[rows], hashes[rows] = their_sizes, their_hashes
        errors.update(their_errors)
    cache.original_sizes, cache.hashes, cache.errors = sizes, hashes, errors


def channel_stats(images: np.ndarray, rows: np.ndarray, seed: int = 0,
                  max_images: int = STATS_MAX_IMAGES) -> tuple[list, list]:
    """Per-channel mean and std to normalize with: those measured, a std of 0 (a constant
    channel) taken as 1 so that normalizing does not divide by zero."""
    mean, std = measure_channels(images, rows, seed, max_images)
    return mean, [value if value > 0 else 1.0 for value in std]


def measure_channels(images: np.ndarray, rows: np.ndarray, seed: int = 0,
                     max_images: int = STATS_MAX_IMAGES) -> tuple[list, list]:
    """Per-channel mean and std on the 0..1 scale, from up to ``max_images`` of ``rows``, as
    they are (a std of 0 for a constant channel)."""
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
    channels = images.shape[-1]
    step = max(1, STATS_CHUNK_BYTES // (8 * int(np.prod(images.shape[1:]))))
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for begin in range(0, len(rows), step):
        chunk = images[rows[begin:begin + step]].reshape(-1, channels).astype(np.float64)
        total += chunk.sum(axis=0)
        squares += np.square(chunk).sum(axis=0)
        count += len(chunk)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0.0))
    return (mean / 255.0).tolist(), (std / 255.0).tolist()
