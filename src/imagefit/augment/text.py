"""The pipeline of text batches: character indices go to the model as they are (no
normalization, no augmentation, no mixing); ``BatchPipeline``'s calls, for the Learner and
the forward pass."""

from __future__ import annotations

import torch

from .mix import Mix


class TextPipeline:
    """Passes (B, L) batches of character indices through unchanged; ``mix`` is never
    active (what the Learner and --plc ask of a pipeline)."""

    def __init__(self) -> None:
        self.mix = Mix()

    def __call__(self, x: torch.Tensor, *, size: int | None = None) -> torch.Tensor:
        return x

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
                    size: int | None = None, mix: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y
