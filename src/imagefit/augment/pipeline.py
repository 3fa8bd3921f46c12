"""``BatchPipeline``: uint8 batch -> float -> augment (training only) -> normalize."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .presets import Transform


class BatchPipeline:
    """Turns a uint8 (B, C, H, W) batch into the normalized float batch the model sees.

    ``mean`` and ``std`` are per channel on the 0..1 scale. Augmentation runs on training
    batches only; validation and test batches are only converted and normalized.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        transforms: Sequence[Transform] = (),
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.transforms = list(transforms)

    def __call__(
        self, x: torch.Tensor, *, train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if not (train and self.transforms):
            # One fused pass: (x / 255 - mean) / std.
            return torch.addcmul(-mean / std, x.float(), 1.0 / (255.0 * std))
        x = x.float().div_(255.0)
        for transform in self.transforms:
            x = transform(x, generator)
        return (x - mean) / std
