"""MixUp and CutMix: ``(x, y, generator) -> (x, y)`` with a lambda per image.

Targets must be floats (N, K): one-hot or soft class probabilities, multi-label 0/1 vectors,
or (standardized) regression values; all of them mix linearly with the images' lambda.
"""

from __future__ import annotations

import numpy as np
import torch

from .color import box_mask


def _beta(generator: torch.Generator, alpha: float, n: int) -> torch.Tensor:
    """Beta(alpha, alpha) draws seeded from ``generator`` (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n)).float()


class Mix:
    """MixUp (``mixup`` = its alpha) and/or CutMix (``cutmix`` = its alpha), each image with
    a partner from the same batch and probability ``p``. With both on, each image uses one
    of them, chosen at random."""

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, p: float = 1.0) -> None:
        self.mixup = mixup
        self.cutmix = cutmix
        self.p = p

    @property
    def active(self) -> bool:
        return bool(self.mixup or self.cutmix) and self.p > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, height, width = x.shape
        device = generator.device
        partner = torch.randperm(n, generator=generator, device=device).to(x.device)
        use_cutmix = torch.rand(n, generator=generator, device=device) < (
            0.5 if self.mixup and self.cutmix else float(bool(self.cutmix)))
        lam = torch.where(use_cutmix, _beta(generator, self.cutmix or 1.0, n).to(device),
                          _beta(generator, self.mixup or 1.0, n).to(device))
        mixed = torch.rand(n, generator=generator, device=device) < self.p
        lam = torch.where(mixed, lam, torch.ones_like(lam))

        # CutMix: a box of area (1 - lam) from the partner; lam becomes the kept area.
        side = (1 - lam).clamp(min=0).sqrt()
        box_h, box_w = side * height, side * width
        cy = torch.rand(n, generator=generator, device=device) * height
        cx = torch.rand(n, generator=generator, device=device) * width
        top, bottom = (cy - box_h / 2).clamp(0, height), (cy + box_h / 2).clamp(0, height)
        left, right = (cx - box_w / 2).clamp(0, width), (cx + box_w / 2).clamp(0, width)
        mask = box_mask(x, top.round(), left.round(), bottom.round(), right.round())
        mask &= (use_cutmix & mixed).to(x.device)[:, None, None, None]
        area = mask.flatten(1).float().mean(dim=1)
        lam = torch.where(use_cutmix.to(x.device), 1 - area, lam.to(x.device))

        blended = x * lam[:, None, None, None] + x[partner] * (1 - lam[:, None, None, None])
        x = torch.where(mask, x[partner], torch.where(
            use_cutmix.to(x.device)[:, None, None, None], x, blended))
        y = y * lam[:, None].to(y.dtype) + y[partner] * (1 - lam[:, None].to(y.dtype))
        return x, y
