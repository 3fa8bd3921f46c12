"""RandAugment and TrivialAugment on whole batches: each image draws its own operations and
magnitudes. The geometric operations of all rounds are composed into one matrix per image
(one resampling, done by the pipeline); the pixel operations then run per round on the
images that drew them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import color
from .geometry import identity, rotation_matrix, scale_matrix, shear_matrix, translation_matrix

MAX_MAGNITUDE = 10.0


@dataclass(frozen=True)
class Operation:
    """A policy operation: ``matrix(m)`` for geometry or ``pixels(x, m, generator)``; m is the
    signed magnitude in [-1, 1] per image."""

    name: str
    matrix: Callable[[torch.Tensor], torch.Tensor] | None = None
    pixels: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None


def _ones(m: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(m)


def _cutout(x: torch.Tensor, m: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A grey square of side up to half the image, anywhere in it."""
    n, _, height, width = x.shape
    side = m.abs().to(x.device) * 0.5 * min(height, width)
    top = torch.rand(n, generator=generator, device=generator.device).to(x.device) * height
    left = torch.rand(n, generator=generator, device=generator.device).to(x.device) * width
    mask = color.box_mask(x, top - side / 2, left - side / 2, top + side / 2, left + side / 2)
    return torch.where(mask, torch.full_like(x, 0.5), x)


OPERATIONS: tuple[Operation, ...] = (
    Operation("identity", pixels=lambda x, m, g: x),
    Operation("flip", matrix=lambda m: scale_matrix(-_ones(m), _ones(m))),
    Operation("translate_x", matrix=lambda m: translation_matrix(0.6 * m, 0 * m)),
    Operation("translate_y", matrix=lambda m: translation_matrix(0 * m, 0.6 * m)),
    Operation("rotate", matrix=lambda m: rotation_matrix(m * (30 * torch.pi / 180))),
    Operation("shear_x", matrix=lambda m: shear_matrix(0.3 * m, 0 * m)),
    Operation("shear_y", matrix=lambda m: shear_matrix(0 * m, 0.3 * m)),
    Operation("brightness", pixels=lambda x, m, g: color.adjust_brightness(x, 1 + 0.9 * m)
              .clamp(0, 1)),
    Operation("color", pixels=lambda x, m, g: color.adjust_saturation(x, 1 + 0.9 * m)
              .clamp(0, 1)),
    Operation("contrast", pixels=lambda x, m, g: color.adjust_contrast(x, 1 + 0.9 * m)
              .clamp(0, 1)),
    Operation("sharpness", pixels=lambda x, m, g: color.sharpen(x, 1 + 0.9 * m)),
    Operation("posterize", pixels=lambda x, m, g: color.posterize(x, 8 - (4 * m.abs()).round())),
    Operation("solarize", pixels=lambda x, m, g: color.solarize(x, 1 - m.abs())),
    Operation("autocontrast", pixels=lambda x, m, g: color.autocontrast(x)),
    Operation("equalize", pixels=lambda x, m, g: color.equalize(x)),
    Operation("cutout", pixels=_cutout),
)


@dataclass
class PolicyPlan:
    """What a policy drew for one batch: composed matrices and, per round, each image's
    operation index and signed magnitude."""

    matrices: torch.Tensor
    rounds: list[tuple[torch.Tensor, torch.Tensor]]


class RandAugment:
    """``n`` operations per image, each drawn uniformly per image and skipped with
    probability ``skip``, at magnitude ``magnitude`` of 10 (a random sign per image).
    ``trivial=True`` is TrivialAugment: one operation, magnitude uniform per image in
    [0, magnitude]."""

    def __init__(self, n: int = 2, magnitude: float = 9.0, skip: float = 0.0,
                 trivial: bool = False,
                 operations: tuple[Operation, ...] = OPERATIONS) -> None:
        self.n = 1 if trivial else n
        self.magnitude = magnitude
        self.skip = skip
        self.trivial = trivial
        self.operations = operations

    def sample(self, n: int, generator: torch.Generator) -> PolicyPlan:
        device = generator.device
        matrices = identity(n, device)
        rounds = []
        for _ in range(self.n):
            chosen = torch.randint(0, len(self.operations), (n,), generator=generator,
                                   device=device)
            if self.skip:
                skipped = torch.rand(n, generator=generator, device=device) < self.skip
                chosen = torch.where(skipped, torch.zeros_like(chosen), chosen)
            level = torch.full((n,), self.magnitude / MAX_MAGNITUDE, device=device)
            if self.trivial:
                level = level * torch.rand(n, generator=generator, device=device)
            sign = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1, 1)
            signed = level * sign
            for index, operation in enumerate(self.operations):
                if operation.matrix is not None:
                    drawn = (chosen == index)[:, None, None]
                    matrices = matrices @ torch.where(drawn, operation.matrix(signed),
                                                      identity(n, device))
            rounds.append((chosen, signed))
        return PolicyPlan(matrices, rounds)

    def apply_pixels(self, x: torch.Tensor, plan: PolicyPlan,
                     generator: torch.Generator) -> torch.Tensor:
        """Run each round's pixel operations on the images that drew them."""
        for chosen, signed in plan.rounds:
            chosen, signed = chosen.to(x.device), signed.to(x.device)
            for index, operation in enumerate(self.operations):
                if operation.pixels is None or operation.name == "identity":
                    continue
                rows = (chosen == index).nonzero().squeeze(1)
                if len(rows):
                    x[rows] = operation.pixels(x[rows], signed[rows], generator)
        return x
