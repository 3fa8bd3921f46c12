"""The preflight of a fit's resources: before the image cache is built or a model made, what
the chosen image size, batch size or text length would take (the cache on disk, decoding,
a training step in memory) is set against what the machine has free, and a choice that
cannot fit is refused in one line naming the option and the largest value that fits.

The estimates (docs/LIMITS.md): the cache is uint8, size x size x channels a row, on the
disk of the cache folder (in memory for arrays); decoding holds a few images of the cache's
size per thread; a training step holds what ``models.footprint`` measures on the meta
device, per example, times the batch. The memory compared with is the training device's:
the host's available memory on a CPU, a CUDA device's free memory on a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ImageOptions
from ..data.cache import (
    CacheSettings,
    bytes_to_build,
    cache_bytes,
    decode_bytes,
    default_cache_root,
)
from ..data.resources import available_memory, format_bytes, free_disk, largest_that_fits
from ..data.table import Table
from ..errors import ImagefitError
from ..models import default_model_name
from ..models.footprint import (
    OPTIMIZER_COPIES,
    Footprint,
    image_model_footprint,
    text_model_footprint,
)
from ..models.text import TEXT_MODEL

MIN_IMAGE_SIZE = ImageOptions.model_fields["image_size"].metadata[0].ge
INT64_BYTES = 8  # an encoded character
WORKER_BYTES = 1_100_000_000  # a tune worker after its imports (1.05 GB measured), before data
TEXT_VOCABULARY = 256  # the embedding's rows: the activations do not depend on them


@dataclass(frozen=True)
class Room:
    """What the machine has free: disk under the cache folder (None: nothing is written),
    host memory, and the memory of the device a model trains on (None: the host's)."""

    cache_root: Path | None
    disk: int
    host: int
    device: int | None

    @classmethod
    def measure(cls, cache_root: Path | None, device: torch.device | None) -> Room:
        on_gpu = device is not None and device.type == "cuda"
        return cls(cache_root, free_disk(cache_root) if cache_root is not None else 0,
                   available_memory(), torch.cuda.mem_get_info(device)[0] if on_gpu else None)

    @property
    def step_memory(self) -> int:
        return self.host if self.device is None else self.device

    def step_memory_phrase(self) -> str:
        where = "available" if self.device is None else "free on the GPU"
        return f"{where}: {format_bytes(self.step_memory)}"

    def step_phrase(self, batch_size: int, step: int, training: bool = True) -> str:
        return (f"{'a training step on ' if training else ''}a batch of {batch_size} would take "
                f"about {format_bytes(step)} of memory ({self.step_memory_phrase()})")


@dataclass
class ImageNeeds:
    """What caching ``count`` images and training on them takes, as a function of the image
    size and the batch size."""

    count: int
    channels: int
    in_memory: bool  # arrays: the cache is held in memory, not written to disk
    footprint: Footprint | None  # None: no batch is made; no parameters: no model trained
    on_gpu: bool

    def cache(self, size: int) -> int:
        return cache_bytes(self.count, CacheSettings(size, self.channels))

    def step(self, size: int, batch_size: int) -> int:
        if self.footprint is None:
            return 0
        return self.footprint.step_bytes(batch_size, self.channels * size * size)

    def host(self, size: int, batch_size: int) -> int:
        """Host memory at the peak: the decoding (and an in-memory cache), or the step on a
        CPU."""
        held = self.cache(size) if self.in_memory else 0
        return held + max(decode_bytes(CacheSettings(size, self.channels)),
                          0 if self.on_gpu else self.step(size, batch_size))

    def disk_short(self, size: int, room: Room, disk: int | None = None) -> bool:
        return not self.in_memory and (self.cache(size) if disk is None else disk) > room.disk

    def shortfalls(self, size: int, batch_size: int, room: Room, disk: int | None = None
                   ) -> list[str]:
        """What does not fit, each as a phrase; ``disk``: the cache's bytes still to write
        when known (a cache built before needs none)."""
        found = []
        if self.disk_short(size, room, disk):
            needed = self.cache(size) if disk is None else disk
            found.append(f"the image cache would need {format_bytes(needed)} on "
                         f"{room.cache_root} (free: {format_bytes(room.disk)})")
        step, host = self.step(size, batch_size), self.host(size, batch_size)
        if step > room.step_memory:
            found.append(room.step_phrase(batch_size, step, self.footprint.parameter_bytes > 0))
        elif host > room.host:
            what = "the images and decoding" if self.in_memory else "decoding"
            found.append(f"{what} would take {format_bytes(host)} of memory (available: "
                         f"{format_bytes(room.host)})")
        return found

    def fits(self, size: int, batch_size: int, room: Room, disk: int | None = None) -> bool:
        return not self.shortfalls(size, batch_size, room, disk)


def check_image_room(table: Table, settings: CacheSettings, cfg: ImageOptions,
                     batch_size: int | None, device: torch.device | None = None,
                     rows: np.ndarray | None = None) -> None:
    """Refuse an image size (or batch size) whose cache would not fit the free disk, or whose
    decoding or training step (at ``batch_size``; None: no batch is made) would not fit in
    memory, before anything is written. Options without a model (show-batch) count the
    batch pipeline's copies only. ``rows``: the rows a shard caches."""
    footprint = None if batch_size is None else Footprint(0.0, 0)
    if batch_size is not None and hasattr(cfg, "model"):
        model = cfg.model
        if model == "auto":
            model = default_model_name(settings.size, table.task.single_label)
        footprint = image_model_footprint(
            model, settings.channels, table.task.n_out, settings.size,
            head=getattr(cfg, "head", "timm"), head_hidden=getattr(cfg, "head_hidden", None),
            act=getattr(cfg, "act", None))
    in_memory = table.arrays is not None
    count = len(table) if rows is None else len(np.unique(rows))
    needs = ImageNeeds(count, settings.channels, in_memory, footprint,
                       device is not None and device.type == "cuda")
    root = None if in_memory else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root()
    room = Room.measure(root, device)
    if footprint is not None:
        check_weights_room(footprint, cfg, room)
    disk = None if in_memory else bytes_to_build(table.paths, settings, root, rows)
    batch = batch_size or 1
    shortfalls = needs.shortfalls(settings.size, batch, room, disk)
    if not shortfalls:
        return
    size = largest_that_fits(lambda side: needs.fits(side, batch, room), MIN_IMAGE_SIZE,
                             settings.size - 1)
    smaller_batch = None
    disk_short = needs.disk_short(settings.size, room, disk)
    if batch > 1 and not disk_short:
        smaller_batch = largest_that_fits(
            lambda count: needs.fits(settings.size, count, room, disk), 1, batch - 1)
    chosen = cfg.model_fields_set
    if "bs" in chosen and not disk_short and not {"image_size", "image_sizes"} & chosen:
        option = f"--bs {cfg.bs}"
        remedy = (f"the largest batch that fits is {smaller_batch}" if smaller_batch else
                  "no batch fits at this size") + (
            f" (or --image-size {size} at this batch)" if size is not None else "")
    else:
        option = _size_option(cfg, settings.size)
        remedy = _remedy(size, smaller_batch)
    raise ImagefitError(f"{option}: {' and '.join(shortfalls)}; {remedy}")


def check_weights_room(footprint: Footprint, cfg: ImageOptions, room: Room) -> None:
    """Refuse a model whose weights alone, with their gradients and optimizer moments, would
    not fit in memory at any image size (a huge --head-hidden), naming the option."""
    weights = OPTIMIZER_COPIES * footprint.parameter_bytes
    if weights <= room.step_memory:
        return
    option = (f"--head-hidden {cfg.head_hidden}" if getattr(cfg, "head_hidden", None)
              else f"--model {cfg.model}")
    raise ImagefitError(f"{option}: the model's weights, with their gradients and optimizer "
                        f"moments, would take {format_bytes(weights)} of memory "
                        f"({room.step_memory_phrase()}); choose a smaller one")


def _size_option(cfg: ImageOptions, size: int) -> str:
    if cfg.image_sizes:
        return f"--image-sizes {','.join(str(s) for s in cfg.image_sizes)}"
    if "image_size" in cfg.model_fields_set:
        return f"--image-size {size}"
    return f"image size {size} (the default; --image-size sets it)"


def _remedy(size: int | None, batch_size: int | None) -> str:
    if size is None and batch_size is None:
        return "no image size fits: free disk space or memory, or give --cache-dir on a " \
            "larger disk"
    if size is None:
        return f"--bs {batch_size} fits at this size"
    return f"the largest size that fits is {size}" + (
        f" (or --bs {batch_size} at this size)" if batch_size is not None else "")


def check_text_room(table: Table, length: int, batch_size: int | None,
                    device: torch.device | None = None) -> None:
    """Refuse a --text-length whose encoded texts (8 bytes a character, every row) or whose
    training step (at ``batch_size``; None: no model is trained) would not fit in memory,
    before the texts are encoded."""
    footprint = text_model_footprint(TEXT_MODEL, TEXT_VOCABULARY, table.task.n_out, length)
    room = Room.measure(None, device)

    def shortfall(chars: int) -> str | None:
        codes = len(table) * chars * INT64_BYTES
        step = footprint.step_bytes(batch_size, chars) if batch_size else 0
        host = codes + (0 if room.device is not None else step)
        if step > room.step_memory:
            return room.step_phrase(batch_size, step)
        if host > room.host:
            what = "the encoded texts" + (" and a training step" if host > codes else "")
            return (f"{what} would take {format_bytes(host)} of memory (available: "
                    f"{format_bytes(room.host)})")
        return None

    reason = shortfall(length)
    if reason is None:
        return
    largest = largest_that_fits(lambda chars: shortfall(chars) is None, 1, length - 1)
    remedy = f"the largest length that fits is {largest}" if largest else \
        "no length fits: free memory, or train on fewer rows"
    raise ImagefitError(f"--text-length {length}: {reason}; {remedy}")


def check_workers_room(workers: int) -> None:
    """Refuse more tune workers (processes) than the memory holds at their start-up alone."""
    available = available_memory()
    if workers * WORKER_BYTES <= available:
        return
    raise ImagefitError(
        f"--workers {workers}: {workers} processes would take about "
        f"{format_bytes(workers * WORKER_BYTES)} of memory for their imports alone "
        f"({format_bytes(WORKER_BYTES)} each; available: {format_bytes(available)}); the most "
        f"that fit is {max(1, available // WORKER_BYTES)}")
