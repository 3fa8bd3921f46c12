"""Label-preserving geometry done as gathers: flips and integer translations need no
resampling, so they cost little and never blur."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flip_horizontal(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    mask = torch.rand(len(x), generator=generator, device=generator.device) < p
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)


def translate(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-pad, pad] on both axes,
    filling the border by reflection."""
    if pad <= 0:
        return x
    batch, channels, height, width = x.shape
    shifts = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator,
                           device=generator.device).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = shifts[0][:, None] + torch.arange(height, device=x.device)
    cols = shifts[1][:, None] + torch.arange(width, device=x.device)
    index_b = torch.arange(batch, device=x.device)[:, None, None, None]
    index_c = torch.arange(channels, device=x.device)[None, :, None, None]
    out = padded[index_b, index_c, rows[:, None, :, None], cols[:, None, None, :]]
    return out.contiguous(memory_format=torch.channels_last)
