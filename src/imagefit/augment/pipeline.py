"""``BatchPipeline``: uint8 batch -> float -> augment (training only) -> mix -> normalize.

Training order: gathers (flips, dihedral, shifts), then one resampling for every matrix
(rotation, zoom, translation, perspective, random resized crop, the policy's geometry, and a
change of size), then the policy's pixel operations, colour, PCA lighting, erasing, mixing,
normalization. Validation and test batches are only resized and normalized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import AugmentOptions
from . import color, geometry
from .mix import Mix
from .policies import RandAugment


def _pixels(fraction: float, size: int) -> int:
    return max(1, round(fraction * size))


class BatchPipeline:
    """Turns uint8 (B, C, H, W) batches into the normalized float batches a model sees.

    ``mean``/``std`` are per channel on the 0..1 scale; ``lighting`` holds the PCA statistics
    for lighting noise; ``n_classes`` turns class indices into one-hot targets for mixing.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 augment: AugmentOptions | None = None, *, lighting: dict | None = None,
                 n_classes: int | None = None) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.lighting = lighting
        self.n_classes = n_classes
        self.set_augment(augment or AugmentOptions())

    def set_augment(self, options: AugmentOptions) -> None:
        """Train with ``options`` from the next batch on."""
        self.augment = options
        self.policy = (RandAugment(options.randaugment_n, options.randaugment_m,
                                   options.randaugment_skip, trivial=options.trivial)
                       if options.randaugment_n or options.trivial else None)
        self.mix = Mix(options.mixup, options.cutmix, options.mix_p)

    @property
    def resamples(self) -> bool:
        """Whether training batches go through a matrix and a resampling."""
        o = self.augment
        return bool(o.rotate or o.zoom != (1.0, 1.0) or o.translate or o.perspective
                    or o.crop_area or self.policy)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std in one pass."""
        std = self.std.to(x.device)
        return torch.addcmul(-self.mean.to(x.device) / std, x, 1.0 / std)

    def __call__(self, x: torch.Tensor, *, size: int | None = None) -> torch.Tensor:
        """An evaluation batch: float, resized to ``size`` when given, normalized."""
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if size is None or size == x.shape[-1]:
            return torch.addcmul(-mean / std, x.float(), 1.0 / (255.0 * std))
        return self.normalize(geometry.resize(x.float() / 255.0, size))

    def matrices(self, n: int, generator: torch.Generator, size: int) -> torch.Tensor:
        """Each training image's composed sampling matrix; flips, symmetries and shifts join
        it too, since the batch is resampled anyway."""
        o = self.augment
        device = generator.device
        matrices = geometry.identity(n, device)
        if o.crop_area:
            matrices = matrices @ geometry.random_resized_crop(generator, n, o.crop_area,
                                                               o.crop_ratio)
        if o.shift:
            matrices = matrices @ geometry.random_shift(generator, n, _pixels(o.shift, size),
                                                        size)
        if o.translate:
            matrices = matrices @ geometry.random_translation(generator, n, o.translate,
                                                              o.affine_p)
        if o.rotate:
            matrices = matrices @ geometry.random_rotation(generator, n, o.rotate, o.affine_p)
        if o.zoom != (1.0, 1.0):
            matrices = matrices @ geometry.random_zoom(generator, n, *o.zoom, o.affine_p)
        if o.perspective:
            matrices = matrices @ geometry.random_perspective(generator, n, o.perspective,
                                                              o.affine_p)
        if o.dihedral:
            matrices = matrices @ geometry.random_dihedral(generator, n, o.dihedral)
        if o.flip or o.vflip:
            matrices = matrices @ geometry.random_flips(generator, n, o.flip, o.vflip)
        return matrices

    def augment_batch(self, x: torch.Tensor, generator: torch.Generator,
                      size: int | None = None) -> torch.Tensor:
        """Label-preserving augmentation of a float batch in [0, 1]."""
        o = self.augment
        plan = self.policy.sample(len(x), generator) if self.policy else None
        if self.resamples:
            matrices = self.matrices(len(x), generator, x.shape[-1])
            if plan is not None:
                matrices = matrices @ plan.matrices
            x = geometry.warp(x, matrices, size, o.padding)
        else:
            if o.dihedral and x.shape[-1] == x.shape[-2]:
                x = geometry.dihedral(x, generator, o.dihedral)
            if o.flip:
                x = geometry.flip_horizontal(x, generator, o.flip)
            if o.vflip:
                x = geometry.flip_vertical(x, generator, o.vflip)
            if o.shift:
                x = geometry.shift(x, generator, _pixels(o.shift, x.shape[-1]))
            if size is not None:
                x = geometry.resize(x, size)
        if plan is not None:
            x = self.policy.apply_pixels(x.contiguous(), plan, generator)
        x = color.color_jitter(x, generator, brightness=o.brightness, contrast=o.contrast,
                               saturation=o.saturation, hue=o.hue, p=o.color_p)
        if o.lighting and self.lighting:
            x = color.pca_lighting(x, generator, self.lighting, o.lighting)
        if o.erase_p:
            x = color.random_erase(x, generator, p=o.erase_p, count=o.erase_count,
                                   area=o.erase_area)
        return x

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
                    size: int | None = None, mix: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An augmented, possibly mixed, normalized training batch and its targets (mixed
        class targets become soft probabilities)."""
        x = self.augment_batch(x.float().div_(255.0), generator, size)
        if mix and self.mix.active:
            if y.ndim == 1:
                y = F.one_hot(y, self.n_classes).float()
            x, y = self.mix(x, y, generator)
        return self.normalize(x), y
