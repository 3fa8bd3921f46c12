"""Callbacks that change what the batches look like as training goes on."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Callback


class ProgressiveResize(Callback):
    """Trains on ``sizes`` in turn, each for an equal share of the epochs (64 -> 128 -> 224);
    validation follows the current size, and each epoch's row records it (``image_size`` in
    metrics.csv and log.txt)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)

    def size_at(self, epoch: int, epochs: int) -> int:
        return self.sizes[min(epoch * len(self.sizes) // max(epochs, 1), len(self.sizes) - 1)]

    def before_epoch(self, learner) -> None:
        learner.image_size = self.size_at(learner.epoch, learner.n_epochs)

    def after_epoch(self, learner) -> None:  # before the progress line and the run writer
        learner.history[-1]["image_size"] = learner.image_size


class MixOff(Callback):
    """Switches MixUp/CutMix off for the last ``epochs`` epochs, so the model ends on clean
    images."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def before_epoch(self, learner) -> None:
        learner.mixing = learner.epoch < learner.n_epochs - self.epochs
