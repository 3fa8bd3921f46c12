"""The pipeline of text batches: character indices go to the model as they are (no
normalization, no augmentation, no mixing); ``BatchPipeline``'s calls, for the Learner and
the forward pass."""

from __future__ import annotations

import torch

from ..config import AugmentOptions
from .mix import Mix


class TextPipeline:
    """Passes (B, L) batches of character indices through unchanged."""

    def __init__(self) -> None:
        self.augment = AugmentOptions()
        self.lighting = None
        self.n_classes = None
        self.policy = None
        self.mix = Mix(0.0, 0.0, 0.0)
        self.mean = torch.zeros(1)
        self.std = torch.ones(1)

    resamples = False

    def __call__(self, x: torch.Tensor, *, size: int | None = None) -> torch.Tensor:
        return x

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
                    size: int | None = None, mix: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y
