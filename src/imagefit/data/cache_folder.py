"""The image caches' folder as a whole: where it is, each cache in it (listed, removed,
cleared) and its size limit, kept by evicting the caches used least recently. A cache folder,
root/<key>, is one ``data.cache`` builds and reads; these are the names of its files that
tell whether it is complete, in use or being built."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from ..errors import ImagefitError
from ..runs import lock_held

CACHE_LIMIT_BYTES = 20 << 30  # default of $IMAGEFIT_CACHE_LIMIT
META, PROGRESS, BUILD_LOCK, USE_LOCK = "meta.json", "progress.json", "build.lock", "use.lock"
PATHS = "paths.json"
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def default_cache_root() -> Path:
    base = os.environ.get("IMAGEFIT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "imagefit" / "images"


def cache_limit() -> int:
    """The cache folder's size limit in bytes: ``$IMAGEFIT_CACHE_LIMIT`` (e.g. 20G, 500M,
    0 for no limit), default 20 GiB."""
    text = os.environ.get("IMAGEFIT_CACHE_LIMIT", "").strip()
    if not text:
        return CACHE_LIMIT_BYTES
    return parse_size(text, "IMAGEFIT_CACHE_LIMIT")


def parse_size(text: str, what: str) -> int:
    """Bytes in a size such as 20G, 500M, 1.5T or a plain number of bytes."""
    number, unit = text.strip().lower().rstrip("ib").rstrip("b"), ""
    if number and number[-1] in _SIZE_UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        value = -1.0
    if not 0 <= value < float(1 << 60):
        raise ImagefitError(f"{what}: '{text}' is not a size; write it like 20G, 500M or 0 "
                            "(no limit)")
    return int(value)


def cache_folders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(root).iterdir() if p.is_dir() and (p / PATHS).is_file())
    except OSError:
        return []


def folder_bytes(folder: Path) -> int:
    """Disk space a cache folder takes (blocks actually used)."""
    total = 0
    for path in folder.iterdir():
        try:
            total += path.stat().st_blocks * 512
        except OSError:
            continue
    return total


def in_use(folder: Path) -> bool:
    """Whether some process has the cache open (holds its use lock)."""
    return lock_held(folder / USE_LOCK)


def last_used(folder: Path) -> float:
    for name in (USE_LOCK, META, PROGRESS, PATHS):
        try:
            return (folder / name).stat().st_mtime
        except OSError:
            continue
    return 0.0


def list_caches(root: str | Path | None = None) -> list[dict]:
    """Every cache under ``root``, most recently used first: its key, what it was built
    from, images, settings, size on disk, when last used, whether it is complete and in use."""
    root = Path(root) if root else default_cache_root()
    entries = []
    for folder in cache_folders(root):
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError):
            meta = None
        entries.append({
            "key": folder.name,
            "description": (meta or {}).get("description", ""),
            "images": (meta or {}).get("count"),
            "settings": (meta or {}).get("settings"),
            "bytes": folder_bytes(folder),
            "last_used": last_used(folder),
            "complete": meta is not None,
            "in_use": in_use(folder),
        })
    return sorted(entries, key=lambda e: -e["last_used"])


def remove_cache(folder: Path) -> bool:
    """Delete one cache unless a process is building or using it; True when it was
    removed. Both locks are held while it goes, so no process can start using it then."""
    try:
        with open(folder / BUILD_LOCK, "a") as build, open(folder / USE_LOCK, "a") as use:
            fcntl.flock(build, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)
    except (BlockingIOError, OSError):
        return False
    return True


def clear_caches(root: str | Path | None = None) -> list[dict]:
    """Remove every cache under ``root`` that no process is building or using; returns the
    entries (as ``list_caches`` gives them) of those removed."""
    root = Path(root) if root else default_cache_root()
    return [entry for entry in list_caches(root) if remove_cache(root / entry["key"])]


def evict(root: str | Path | None = None, limit: int | None = None,
          keep: Path | None = None) -> list[str]:
    """Remove the caches used least recently (never ``keep`` or one in use) until the cache
    folder is within ``limit`` bytes (default ``cache_limit()``, 0: no limit); returns the
    keys removed."""
    root = Path(root) if root else default_cache_root()
    limit = cache_limit() if limit is None else limit
    if not limit:
        return []
    folders = cache_folders(root)
    sizes = {folder: folder_bytes(folder) for folder in folders}
    total = sum(sizes.values())
    removed = []
    for folder in sorted(folders, key=last_used):
        if total <= limit:
            break
        if folder != keep and remove_cache(folder):
            total -= sizes[folder]
            removed.append(folder.name)
    return removed
