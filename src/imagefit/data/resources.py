"""What the machine has room for (free disk under a folder, memory available) and the
arithmetic of asking: a size in bytes for a user, and the largest value of an option that
still fits. The preflight of a fit (``workflows/preflight.py``) and the image cache use
these to refuse, before anything is written, what could not fit."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import ImagefitError

_UNITS = ("bytes", "kB", "MB", "GB", "TB", "PB", "EB")


def free_disk(folder: str | Path) -> int:
    """Bytes free on the disk that holds ``folder``, or would hold it (its nearest existing
    parent is asked when it does not exist yet)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def available_memory() -> int:
    """Bytes of memory a new allocation can take without swapping: psutil's ``available``
    when psutil is installed, else Linux's MemAvailable, else the free physical pages."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_bytes(count: float) -> str:
    """A byte count as a user reads it: 812 MB, 1.2 TB (powers of 1000)."""
    value, unit = float(count), 0
    while value >= 999.5 and unit < len(_UNITS) - 1:
        value, unit = value / 1000, unit + 1
    if unit == 0:
        return f"{int(value)} bytes"
    return f"{value:.2g} {_UNITS[unit]}" if value < 10 else f"{value:.0f} {_UNITS[unit]}"


def largest_that_fits(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest value in ``low..high`` for which ``fits`` holds, or None when even ``low``
    does not fit; ``fits`` must hold for every value below one it holds for (a need that
    grows with the value)."""
    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


FLOAT_BYTES = 4  # an image value in a training step (32-bit)


def check_one_image_fits(option: str, size: int, channels: int | None = None) -> None:
    """Refuse at once, before torch is imported, an image size of which one image alone (one
    channel at least, as 32-bit numbers, nothing else of the step counted) exceeds the memory
    available: the floor under every estimate the preflight makes later, checked in a
    fraction of a second where the preflight needs the data and the model."""
    channels = channels or 1
    need = channels * size * size * FLOAT_BYTES
    have = available_memory()
    if need > have:
        bound = int((have / (channels * FLOAT_BYTES)) ** 0.5)
        raise ImagefitError(f"{option} {size}: one image alone would take {format_bytes(need)} "
                            f"of memory as 32-bit numbers (available: {format_bytes(have)}); "
                            f"give a size well under {bound:,}: the preflight then names the "
                            "largest a training step fits")
