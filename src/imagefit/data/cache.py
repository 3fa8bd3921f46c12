"""The decode-once image cache: every image decoded, converted and resized exactly once, kept
as uint8 (N, size, size, C) in a memory-mapped file that later epochs, folds and runs read.

The cache key is the file list with sizes and modification times plus the settings, so a
changed file or setting gives a new cache. A build streams into the memmap in chunks and
records its progress; an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ImagefitError, ImagefitWarning
from .cache_folder import (
    BUILD_LOCK,
    META,
    PATHS,
    PROGRESS,
    USE_LOCK,
    cache_folders,
    default_cache_root,
    evict,
    folder_bytes,
)
from .decode import DECODE_ERRORS, CacheSettings, decode_image
from .resources import format_bytes, free_disk

CACHE_FORMAT = 2
CHUNK = 256


@dataclass
class ImageCache:
    """Decoded images, their original (width, height) and the rows that could not be read."""

    images: np.ndarray
    original_sizes: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    built_seconds: float = 0.0  # decoding the images into the cache in this process
    hashes: np.ndarray | None = None  # (N, 16) digests of the cached pixels, when stored
    folder: Path | None = None  # where a file cache lives
    in_use: Any = field(default=None, repr=False)  # the open use lock (see build_cache)
    # A shard (one rank's share, build_cache's ``rows``): ``images`` holds only the rows
    # ``held`` (sorted), in that order; ``places`` maps a row to its place there.
    held: np.ndarray | None = None
    paths: list[str] | None = field(default=None, repr=False)
    settings: CacheSettings | None = None

    def __len__(self) -> int:
        return len(self.images) if self.held is None else len(self.paths)

    def content_hashes(self) -> np.ndarray:
        """(N, 16) uint8 digests of every cached image: equal rows, equal pixels."""
        if self.hashes is None:
            self.hashes = hash_images(self.images)
        return self.hashes

    @property
    def failed(self) -> list[int]:
        return sorted(self.errors)

    def tensor(self) -> torch.Tensor:
        """The images as a uint8 (N, H, W, C) tensor sharing the cache's memory (a shard's:
        its rows only, see ``places``)."""
        return torch.from_numpy(self.images)

    def places(self) -> torch.Tensor | None:
        """A shard's map from a row to its place in ``tensor()`` (-1 where not held), for
        ``Loader``'s ``places``; None for a whole cache, where the two are the same."""
        if self.held is None:
            return None
        places = torch.full((len(self),), -1, dtype=torch.int64)
        places[torch.from_numpy(self.held)] = torch.arange(len(self.held))
        return places

    def local(self, rows) -> np.ndarray:
        """Places in ``images`` of ``rows``, which a shard must hold."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows if self.held is None else np.searchsorted(self.held, rows)

    def read(self, rows) -> np.ndarray:
        """``images`` of ``rows`` (N, H, W, C); a shard decodes those it does not hold (the
        few images a report shows)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.held is None:
            return self.images[rows]
        places = np.searchsorted(self.held, rows)
        held = places < len(self.held)
        held[held] = self.held[places[held]] == rows[held]
        result = np.zeros((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        result[held] = self.images[places[held]]
        for k in np.flatnonzero(~held).tolist():
            array, _ = _try_decode(self.paths[rows[k]], self.settings)
            if array is not None:
                result[k] = array
        return result


def _try_decode(path: str, settings: CacheSettings):
    try:
        return decode_image(path, settings)
    except DECODE_ERRORS as error:
        return None, f"{type(error).__name__}: {error}".splitlines()[0]


# -- building -----------------------------------------------------------------------------
#
# A cache folder, root/<key>, is named by the file list and the settings alone. It holds
# images.u8 (N, size, size, C), sizes.i32 (original width and height), hashes.u8 (a 128-bit
# digest of each cached image, for duplicate checks), stats.npy (each file's size,
# modification and change times and inode when it was decoded), paths.json, meta.json
# (written last: the cache is complete) and, while a build runs, progress.json. A file whose
# stats changed since is decoded again in place, so editing one file costs one decode, and a
# new file list borrows the rows it shares with another cache of the same settings. Writers
# take build.lock; every process using a cache holds use.lock shared, which keeps it from
# being evicted. The whole cache folder is kept under a size limit by evicting the caches
# used least recently.

IMAGES, SIZES, HASHES, STATS = "images.u8", "sizes.i32", "hashes.u8", "stats.npy"
HELD = "held.npy"  # a shard's rows; the arrays then hold these rows, in this order
HASH_BYTES = 16
ROW_BYTES = 2 * 4 + HASH_BYTES + 4 * 8  # sizes.i32, hashes.u8 and stats.npy of one row


def cache_key(paths: list[str], settings: CacheSettings, rows: np.ndarray | None = None) -> str:
    """Hash of the file list and the settings (the files' contents are checked by their
    stats, row by row, when the cache is opened), and of the rows a shard holds."""
    digest = hashlib.sha1(json.dumps([CACHE_FORMAT, asdict(settings)]).encode())
    for path in paths:
        digest.update(f"{path}\n".encode())
    if rows is not None:
        digest.update(b"rows" + np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return digest.hexdigest()[:20]


def file_stats(paths: list[str]) -> np.ndarray:
    """(N, 4) int64: size, modification time, change time (ns) and inode of each file. The
    change time moves whenever a file is written, even when its size and modification time
    are set back, so a rewritten file is noticed."""
    stats = np.empty((len(paths), 4), dtype=np.int64)
    for row, path in enumerate(paths):
        try:
            stat = os.stat(path)
        except OSError:
            raise ImagefitError(f"{path} disappeared: restore it or remove it from the data") \
                from None
        stats[row] = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    return stats


def hash_images(images: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """The first 128 bits of the SHA-256 digest of each row's pixels, as (len(rows), 16)
    uint8, read in chunks of about 64 MiB so a memory-mapped cache is never loaded whole."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    row_bytes = max(1, int(np.prod(images.shape[1:])))
    step = max(1, (64 << 20) // row_bytes)
    digests = []
    for begin in range(0, len(rows), step):
        part = rows[begin:begin + step]
        consecutive = len(part) and part[-1] - part[0] == len(part) - 1
        chunk = images[part[0]:part[-1] + 1] if consecutive else images[part]
        digests += [_digest(image) for image in np.ascontiguousarray(chunk)]
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(rows), HASH_BYTES)


def _digest(image: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(image)).digest()[:HASH_BYTES]


def _write_json(path: Path, data: dict | list) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(data))
    partial.replace(path)


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """The cache folder's build lock, held exclusively; the folder is made again if an
    eviction removed it while this process waited."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / BUILD_LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(folder / BUILD_LOCK).st_ino
            except FileNotFoundError:
                continue  # removed while we waited: start again
            if current == os.fstat(handle.fileno()).st_ino:
                yield
                return


def build_cache(
    paths: list[str],
    settings: CacheSettings,
    root: str | Path | None = None,
    *,
    strict: bool = False,
    progress: bool = True,
    threads: int | None = None,
    description: str = "",
    rows: np.ndarray | None = None,
) -> ImageCache:
    """Decode ``paths`` once into a memory-mapped cache, or open the cache built before,
    decoding again only the files that changed since.

    Unreadable files are recorded in ``errors`` (and warned about by the caller), or raise an
    ``ImagefitError`` with ``strict``. After a build, caches used least recently are evicted
    while the cache folder is over its limit (``$IMAGEFIT_CACHE_LIMIT``, default 20G).

    ``rows`` makes a shard: only those files are looked at, decoded and stored (one rank of a
    multi-machine fit holds its share, ``distributed.sharded_data``). Its ``images`` hold
    those rows in order; ``errors`` and the rest are indexed by the file's row as always.

    A cache the disk has no room for is refused before anything is written; a build that
    fails before its first chunk is done leaves no folder behind.
    """
    root = Path(root) if root else default_cache_root()
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
    folder = root / cache_key(paths, settings, rows)
    held = np.arange(len(paths)) if rows is None else rows
    stats = file_stats([paths[row] for row in held.tolist()])
    _require_disk(folder, root, len(held), settings)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ImagefitError(f"cannot create the image cache in {root} ({error.strerror}): "
                            "give a writable folder with --cache-dir or $IMAGEFIT_CACHE") \
            from None
    started = time.perf_counter()
    with _build_lock(folder):
        if (folder / META).is_file():
            decoded = _refresh(folder, paths, held, settings, stats, progress, threads)
        else:
            try:
                decoded = _build(folder, root, paths, held, settings, stats, progress,
                                 threads, strict, description, shard=rows is not None)
            except BaseException:
                _remove_unstarted(folder)
                raise
        cache = _open(folder, paths, held, settings, strict)  # in use before the lock goes
    if rows is not None:
        cache.held, cache.paths, cache.settings = rows, paths, settings
    if decoded:
        cache.built_seconds = time.perf_counter() - started
        evict(root, keep=folder)
    return cache


def cache_bytes(count: int, settings: CacheSettings) -> int:
    """Bytes a complete cache of ``count`` images takes on disk: the pixels (uint8, size x
    size x channels each) and, per row, the original size, the digest and the file stats."""
    return count * (settings.size * settings.size * settings.channels + ROW_BYTES)


def bytes_to_build(paths: list[str], settings: CacheSettings, root: str | Path | None = None,
                   rows: np.ndarray | None = None) -> int:
    """Disk bytes that building this cache would still add: none when it is complete (a
    refresh rewrites rows in place), the rest of it when a build was interrupted."""
    root = Path(root) if root else default_cache_root()
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
    folder = root / cache_key(paths, settings, rows)
    count = len(paths) if rows is None else len(rows)
    return _bytes_to_build(folder, count, settings)


def _bytes_to_build(folder: Path, count: int, settings: CacheSettings) -> int:
    if (folder / META).is_file():
        return 0
    written = folder_bytes(folder) if folder.is_dir() else 0
    return max(0, cache_bytes(count, settings) - written)


def decode_bytes(settings: CacheSettings, threads: int | None = None) -> int:
    """Memory that decoding into the cache holds at once, beyond the source images: per
    thread about three PIL images of the cache's size (4 bytes a pixel: the resized, the
    converted, the padded) and the array copied from them."""
    threads = threads or os.cpu_count() or 1
    return threads * settings.size * settings.size * (3 * 4 + settings.channels)


def _require_disk(folder: Path, root: Path, count: int, settings: CacheSettings) -> None:
    """Refuse, before anything is written, a cache the disk has no room for."""
    needed = _bytes_to_build(folder, count, settings)
    free = free_disk(root)
    if needed > free:
        raise ImagefitError(
            f"the image cache of {count} images at {settings.size} px would need "
            f"{format_bytes(needed)} on {root} (free: {format_bytes(free)}): free space there, "
            "give a folder on a larger disk with --cache-dir or $IMAGEFIT_CACHE, or cache at a "
            "smaller size")


def _new_arrays(folder: Path, count: int, settings: CacheSettings, mode: str):
    shape = (count, settings.size, settings.size, settings.channels)
    return (np.memmap(folder / IMAGES, dtype=np.uint8, mode=mode, shape=shape),
            np.memmap(folder / SIZES, dtype=np.int32, mode=mode, shape=(count, 2)),
            np.memmap(folder / HASHES, dtype=np.uint8, mode=mode, shape=(count, HASH_BYTES)))


def _decode_rows(places: list[int], held: np.ndarray, paths: list[str],
                 settings: CacheSettings, arrays, errors: dict[str, str],
                 pool: ThreadPoolExecutor, strict: bool) -> None:
    """Decode the rows at ``places`` of ``held`` into the cache's arrays; record (or,
    ``strict``, raise) failures, keyed by the file's row."""
    images, sizes, hashes = arrays
    rows = held[places].tolist()
    for place, row, (array, info) in zip(places, rows, pool.map(
            lambda r: _try_decode(paths[r], settings), rows)):
        if array is None:
            if strict:
                raise _unreadable(paths[row], info)
            errors[str(row)] = info
            images[place], sizes[place], hashes[place] = 0, 0, 0
            continue
        errors.pop(str(row), None)
        images[place], sizes[place] = array, info
        hashes[place] = np.frombuffer(_digest(array), dtype=np.uint8)


def _build(folder: Path, root: Path, paths: list[str], held: np.ndarray,
           settings: CacheSettings, stats: np.ndarray, progress: bool, threads: int | None,
           strict: bool, description: str, shard: bool = False) -> bool:
    """A new cache of the rows ``held`` (every row, or a shard's) in chunks, resuming an
    interrupted build; rows another cache of the same settings already holds (same path and
    stats) are copied instead of decoded. True when anything was written."""
    state = json.loads((folder / PROGRESS).read_text()) if (folder / PROGRESS).is_file() \
        else {"done": 0, "errors": {}}
    start = state["done"]
    mode = "r+" if start and (folder / IMAGES).is_file() else "w+"
    arrays = _new_arrays(folder, len(held), settings, mode)
    if start == 0:
        _write_json(folder / PATHS, paths)
        if shard:
            np.save(folder / HELD, held, allow_pickle=False)
    errors: dict[str, str] = state["errors"]
    donors = _borrow_rows(root, folder, paths, held, settings, stats)
    bar = tqdm(total=len(held), initial=start, desc="caching images", unit="img",
               disable=None if progress and len(held) - start >= CHUNK else True, leave=False)
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for begin in range(start, len(held), CHUNK):
            chunk = range(begin, min(begin + CHUNK, len(held)))
            decode = [place for place in chunk
                      if not _copy_row(place, int(held[place]), donors, arrays, errors)]
            _decode_rows(decode, held, paths, settings, arrays, errors, pool, strict)
            for array in arrays:
                array.flush()
            _write_json(folder / PROGRESS, {"done": chunk.stop, "errors": errors})
            bar.update(len(chunk))
    bar.close()
    _save_stats(folder, stats)
    _write_json(folder / META, {"shape": [len(held), settings.size, settings.size,
                                          settings.channels],
                                "settings": asdict(settings), "errors": errors,
                                "count": len(held), "rows": len(paths), "shard": shard,
                                "description": description, "created": time.time()})
    (folder / PROGRESS).unlink(missing_ok=True)
    return True


def _remove_unstarted(folder: Path) -> None:
    """Remove a cache whose build stopped before it recorded any progress: what it leaves
    cannot be resumed, and its images file is a sparse file the size of the whole cache.
    (The build lock is held; a process waiting for it makes the folder again.)"""
    if not (folder / PROGRESS).is_file():
        shutil.rmtree(folder, ignore_errors=True)


def _refresh(folder: Path, paths: list[str], held: np.ndarray, settings: CacheSettings,
             stats: np.ndarray, progress: bool, threads: int | None) -> bool:
    """Decode again, in place, the rows whose file changed since the cache was written.
    True when any did."""
    stored = _read_stats(folder, len(held))
    changed = np.flatnonzero((stored != stats).any(axis=1)) if stored is not None \
        else np.arange(len(held))
    if not len(changed):
        return False
    meta = json.loads((folder / META).read_text())
    errors = meta["errors"]
    arrays = _new_arrays(folder, len(held), settings, "r+")
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for begin in tqdm(range(0, len(changed), CHUNK), desc="caching changed images",
                          unit="chunk", leave=False,
                          disable=None if progress and len(changed) >= CHUNK else True):
            _decode_rows(changed[begin:begin + CHUNK].tolist(), held, paths, settings, arrays,
                         errors, pool, strict=False)
    for array in arrays:
        array.flush()
    _save_stats(folder, stats)  # after the pixels: a crash in between decodes them again
    _write_json(folder / META, {**meta, "errors": errors})
    return True


def _save_stats(folder: Path, stats: np.ndarray) -> None:
    np.save(folder / "stats.tmp.npy", stats, allow_pickle=False)
    (folder / "stats.tmp.npy").replace(folder / STATS)


def _read_stats(folder: Path, count: int) -> np.ndarray | None:
    try:
        stats = np.load(folder / STATS, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return stats if stats.shape == (count, 4) else None


def _held_rows(folder: Path, count: int) -> np.ndarray:
    """The rows a cache folder holds: a shard's, or all ``count``."""
    if (folder / HELD).is_file():
        return np.load(folder / HELD, allow_pickle=False)
    return np.arange(count)


def _borrow_rows(root: Path, folder: Path, paths: list[str], held: np.ndarray,
                 settings: CacheSettings, stats: np.ndarray) -> dict[int, tuple]:
    """Places of ``held`` whose file the fullest other complete cache with the same settings
    holds in the same state: place -> (its arrays, place there, error)."""
    best: dict[int, tuple] = {}
    wanted = {(paths[row], *stat): place
              for place, (row, stat) in enumerate(zip(held.tolist(), stats.tolist()))}
    for other in cache_folders(root):
        if other == folder or not (other / META).is_file():
            continue
        try:
            meta = json.loads((other / META).read_text())
            if meta["settings"] != asdict(settings):
                continue
            other_paths = json.loads((other / PATHS).read_text())
            other_held = _held_rows(other, len(other_paths))
        except (OSError, ValueError, KeyError):
            continue
        other_stats = _read_stats(other, len(other_held))
        if other_stats is None:
            continue
        matches = {}
        for j, (row, stat) in enumerate(zip(other_held.tolist(), other_stats.tolist())):
            i = wanted.get((other_paths[row], *stat))
            if i is not None:
                matches[i] = (j, row)
        if len(matches) > len(best):
            arrays = _new_arrays(other, len(other_held), settings, "r")
            best = {i: (arrays, j, meta["errors"].get(str(row)))
                    for i, (j, row) in matches.items()}
    return best


def _copy_row(place: int, row: int, donors: dict[int, tuple], arrays,
              errors: dict[str, str]) -> bool:
    if place not in donors:
        return False
    (images, sizes, hashes), source, error = donors[place]
    arrays[0][place], arrays[1][place], arrays[2][place] = images[source], sizes[source], \
        hashes[source]
    if error is not None:
        errors[str(row)] = error
    return True


def _unreadable(path: str, reason: str) -> ImagefitError:
    return ImagefitError(f"{path} is not a readable image ({reason}): fix or remove it, or "
                         "leave out --strict to skip such files")


def _open(folder: Path, paths: list[str], held: np.ndarray, settings: CacheSettings,
          strict: bool) -> ImageCache:
    """The finished cache, marked as in use (and as just used) for as long as it is open."""
    meta = json.loads((folder / META).read_text())
    errors = {int(k): v for k, v in meta["errors"].items()}
    if strict and errors:
        row = min(errors)
        raise _unreadable(paths[row], errors[row])
    in_use = open(folder / USE_LOCK, "a")
    fcntl.flock(in_use, fcntl.LOCK_SH)
    os.utime(folder / USE_LOCK)  # the least recently used caches are evicted first
    count = len(held)
    shape = (count, settings.size, settings.size, settings.channels)
    images = np.memmap(folder / IMAGES, dtype=np.uint8, mode="c", shape=shape)
    sizes = np.array(np.memmap(folder / SIZES, dtype=np.int32, mode="r", shape=(count, 2)))
    hashes = np.memmap(folder / HASHES, dtype=np.uint8, mode="r", shape=(count, HASH_BYTES))
    return ImageCache(images=images, original_sizes=sizes, errors=errors, hashes=hashes,
                      folder=folder, in_use=in_use)


STRICT_REMEDY = "use --strict to stop instead"
NO_ROW_REMEDY = "{count} file(s) have no row in the output, the first {first}"


def warn_unreadable(cache: ImageCache, paths: list[str], remedy: str = STRICT_REMEDY) -> None:
    """One warning that lists the unreadable files and their count, and ends with what the
    command's user can do about them: ``remedy``, where ``{count}`` and ``{first}`` stand for
    the number of skipped files and the first of them (fit takes --strict; predict and
    explain do not, and leave the files out of their output)."""
    if not cache.errors:
        return
    count, first = len(cache.errors), paths[cache.failed[0]]
    shown = "; ".join(f"{paths[r]} ({cache.errors[r]})" for r in cache.failed[:5])
    more = f" and {count - 5} more" if count > 5 else ""
    warnings.warn(
        f"skipped {count} unreadable file(s): {shown}{more} "
        f"({remedy.format(count=count, first=first)})", ImagefitWarning, stacklevel=2
    )


# -- in-memory arrays ---------------------------------------------------------------------

RESIZE_CHUNK_BYTES = 256 << 20  # float pixels resized at once, in and out


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
        pixels = height * width + settings.size * settings.size  # float32, in and out
        step = max(1, RESIZE_CHUNK_BYTES // (4 * settings.channels * pixels))
        images = np.concatenate([
            _resize_batch(images[i:i + step], settings) for i in range(0, n, step)
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
