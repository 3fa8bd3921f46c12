"""Named bundles of batch transforms, chosen with ``--augment``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from .geometry import flip_horizontal, translate

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

PRESETS: dict[str, list[Transform]] = {
    "none": [],
    "flip": [flip_horizontal],
    "shift": [partial(translate, pad=2)],
    "flip_shift": [flip_horizontal, partial(translate, pad=2)],
}


def preset_transforms(name: str) -> list[Transform]:
    return list(PRESETS[name])
