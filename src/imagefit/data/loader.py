"""Batches gathered from the image cache, moved to the device as uint8, prepared ahead of time
by a background thread (no worker processes)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from queue import Empty, Queue

import numpy as np
import torch

from .. import distributed

_END = object()
RESIDENT_SHARE = 0.5  # of a GPU's free memory that an image cache may take to be held there


def on_device_if_it_fits(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``images`` (a uint8 cache) moved once to a CUDA ``device`` when they take at most
    half of its free memory: batches are then gathered there, with no copy per batch and
    no thread. Otherwise (a CPU, or a cache too large) ``images`` as they are, and each
    batch is copied from pinned memory by the loader's thread, ahead of its use."""
    device = torch.device(device)
    if images.device == device or not fits_on_device(
            images.numel() * images.element_size(), device):
        return images
    return images.to(device)


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` take at most RESIDENT_SHARE of a CUDA device's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= RESIDENT_SHARE * free


class Loader:
    """Index batches over ``rows`` of ``images`` (uint8 N,H,W,C) and ``targets``.

    Yields ``(x, y)``: x a uint8 (B, C, H, W) tensor on ``device`` (channels-last in memory,
    as the cache stores it), y the targets of the same rows. Shuffling is seeded per epoch
    (``set_epoch``), so a run and its resumption see the same order. While a batch is in use,
    ``batch_rows`` holds its rows in the order of its images, so a callback can change their
    stored ``targets`` (batches already prepared keep the targets they were read with).

    ``sampler``, when shuffling, replaces the shuffled ``rows`` of each epoch: called with the
    epoch, it returns that epoch's rows in order (as many as ``rows``, e.g. drawn with
    replacement by ``data.sampling.weighted_sampler_rows``).

    With ``world_size`` above 1 (data-parallel ranks), ``batch_size`` is the global batch:
    every rank orders the epoch the same way and yields its contiguous share, ``rank`` of
    ``world_size`` nearly equal parts, of each global batch; ``gather`` puts the ranks'
    outputs back into the order of the global batches.

    With ``counts`` (sharded data, ``distributed.sharded_data``), ``rows`` are this rank's own
    share and ``counts`` every rank's number of rows: each rank orders its own rows (shuffled
    per epoch, seeded by rank too) and takes its part of the global batch from them, every
    rank the same number of batches; ``gather`` puts the ranks' outputs one after the other.
    ``places`` maps a row to its place in ``images`` where those hold a shard's rows only
    (``ImageCache.places``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        prefetch: bool | None = None,  # None: a background thread on CUDA devices only
        sampler: Callable[[int], np.ndarray] | None = None,
        rank: int = 0,
        world_size: int = 1,
        counts: list[int] | None = None,
        places: torch.Tensor | None = None,
    ) -> None:
        self.images = images
        self.targets = targets
        self.rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.counts = None if counts is None or world_size == 1 else [int(c) for c in counts]
        self.rank, self.world_size = rank, world_size
        if self.counts is None:
            self.drop_last = drop_last and len(self.rows) > batch_size
        else:
            self.drop_last = drop_last and all(
                count > self._part(k) for k, count in enumerate(self.counts))
            self._steps = self._sharded_steps()
        self.seed = seed
        self.epoch = 0
        self.device = torch.device(device)
        # A CUDA device computes while the thread gathers the next batch; on a CPU the thread
        # competes with the compute threads for the cores: on 2 cores the small CNN trained at
        # 0.80 of its compute floor with it and 0.97 without (docs/BENCHMARKS.md). Images
        # held on the device (``on_device_if_it_fits``) need no thread.
        self.prefetch = (self.device.type == "cuda" and images.device.type == "cpu") \
            if prefetch is None else prefetch
        self.sampler = sampler
        self.places = places
        self.batch_rows = torch.empty(0, dtype=torch.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.counts is not None:
            return self._steps
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _part(self, rank: int, step: int = 0) -> int:
        """Rank ``rank``'s part of global batch ``step``: the rows left over when the batch
        does not divide evenly go to different ranks in turn."""
        extra = (rank - step) % self.world_size < self.batch_size % self.world_size
        return self.batch_size // self.world_size + extra

    def _sharded_steps(self) -> int:
        """Batches per epoch, the same on every rank (DDP steps together): training, as many
        whole global batches as every rank's share can fill; otherwise enough batches for
        the largest share."""
        if not self.drop_last:
            return max(-(-count // self._part(k)) for k, count in enumerate(self.counts))
        used, steps = [0] * self.world_size, 0
        while True:
            parts = [self._part(k, steps) for k in range(self.world_size)]
            if any(u + p > c for u, p, c in zip(used, parts, self.counts)):
                return steps
            used = [u + p for u, p in zip(used, parts)]
            steps += 1

    def _index_batches(self) -> list[torch.Tensor]:
        rows = self.rows
        if self.shuffle and self.sampler is not None:
            rows = torch.as_tensor(np.asarray(self.sampler(self.epoch)), dtype=torch.int64)
        elif self.shuffle:
            seed = self.seed * 100_003 + self.epoch
            if self.counts is not None:
                seed += 1_000_003 * self.rank  # each rank's own order
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
        # sorted within a batch: neighbouring rows read faster from the memmap
        if self.counts is not None:
            if self.drop_last:
                parts = [self._part(self.rank, step) for step in range(len(self))]
                return [batch.sort().values for batch in rows[:sum(parts)].split(parts)]
            return [batch.sort().values for batch in torch.tensor_split(rows, len(self))]
        # each rank's share cut before sorting: a sorted batch split in halves would give the
        # ranks the low and the high rows, which in a folder source are different classes
        # (each rank's BatchNorm would see half the classes); unshuffled rows are in order
        return [self._share(rows[i * self.batch_size:(i + 1) * self.batch_size],
                            self.rank).sort().values for i in range(len(self))]

    def _share(self, batch: torch.Tensor, rank: int) -> torch.Tensor:
        return torch.tensor_split(batch, self.world_size)[rank]

    def share_positions(self, rank: int) -> torch.Tensor:
        """Where the rows ``rank`` reads in an epoch of an unshuffled loader stand among all
        ranks' rows in the order of the global batches (sharded: after the rows of the ranks
        before it)."""
        if self.counts is not None:
            start = sum(self.counts[:rank])
            return torch.arange(start, start + self.counts[rank])
        order = torch.arange(len(self.rows))
        return torch.cat([self._share(order[i * self.batch_size:(i + 1) * self.batch_size], rank)
                          for i in range(len(self))])

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """One row per row this rank read in an epoch (in its order), from every rank, put
        together in the order of the global batches; ``local`` itself with one rank."""
        if self.world_size == 1:
            return local
        return distributed.gather_in_order(
            local, [self.share_positions(rank) for rank in range(self.world_size)])

    def _load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where = index if self.places is None else self.places[index]
        x = self.images.index_select(0, where.to(self.images.device, non_blocking=True))
        if x.dim() == 4:  # images (N, H, W, C) -> (B, C, H, W); texts stay (B, L)
            x = x.permute(0, 3, 1, 2)
        y = self.targets.index_select(0, index)
        if self.device.type == "cuda":
            x = x.pin_memory() if x.device.type == "cpu" else x
            y = y.pin_memory()
        return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._index_batches()
        if not self.prefetch:
            for index in batches:
                batch = self._load(index)
                self.batch_rows = index
                yield batch
            return
        queue: Queue = Queue(maxsize=2)
        stop = threading.Event()
        # on a GPU the copies run on a stream of their own, beside the compute
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def produce() -> None:
            try:
                for index in batches:
                    if stop.is_set():
                        return
                    if stream is None:
                        queue.put((index, self._load(index), None))
                        continue
                    with torch.cuda.stream(stream):
                        batch = self._load(index)
                        copied = torch.cuda.Event()
                        copied.record(stream)
                    queue.put((index, batch, copied))
            except BaseException as error:  # handed to the consumer, raised there
                queue.put(error)
                return
            queue.put(_END)

        thread = threading.Thread(target=produce, daemon=True, name="imagefit-loader")
        thread.start()
        try:
            while (item := queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                self.batch_rows, batch, copied = item
                if copied is not None:  # compute waits for the copy; the memory is kept
                    current = torch.cuda.current_stream(self.device)  # until compute is done
                    current.wait_event(copied)
                    for tensor in batch:
                        tensor.record_stream(current)
                yield batch
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    queue.get_nowait()
                except Empty:
                    thread.join(0.01)
