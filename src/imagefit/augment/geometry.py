"""Geometry on whole batches with per-sample random parameters.

Flips, the dihedral group and integer shifts are gathers: no resampling, no blur. Rotation,
zoom, translation, perspective and the random resized crop each contribute a 3x3 matrix per
image (output coordinates -> input coordinates, in grid_sample's [-1, 1] space); the matrices
are multiplied and the batch is resampled once, at the output size asked for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.geometry.transform import get_perspective_transform


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def _chance(generator: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) < p


def _on(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask.to(x.device)[:, None, None, None]


# -- gathers ------------------------------------------------------------------------------


def flip_horizontal(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    return torch.where(_on(x, _chance(generator, len(x), p)), x.flip(3), x)


def flip_vertical(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image top-bottom with probability ``p``."""
    return torch.where(_on(x, _chance(generator, len(x), p)), x.flip(2), x)


def dihedral(x: torch.Tensor, generator: torch.Generator, p: float = 1.0) -> torch.Tensor:
    """With probability ``p``, one of the 8 symmetries of the square, uniformly (square
    images): a transpose and two flips, each on or off."""
    bits = torch.randint(0, 8, (len(x),), generator=generator, device=generator.device)
    bits = torch.where(_chance(generator, len(x), p), bits, torch.zeros_like(bits))
    x = torch.where(_on(x, bits & 1 > 0), x.transpose(2, 3), x)
    x = torch.where(_on(x, bits & 2 > 0), x.flip(3), x)
    return torch.where(_on(x, bits & 4 > 0), x.flip(2), x)


def shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-pad, pad] on both axes,
    filling the border by reflection."""
    if pad <= 0:
        return x
    batch, channels, height, width = x.shape
    pad = min(pad, height - 1, width - 1)
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator,
                            device=generator.device).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = offsets[0][:, None] + torch.arange(height, device=x.device)
    cols = offsets[1][:, None] + torch.arange(width, device=x.device)
    index_b = torch.arange(batch, device=x.device)[:, None, None, None]
    index_c = torch.arange(channels, device=x.device)[None, :, None, None]
    out = padded[index_b, index_c, rows[:, None, :, None], cols[:, None, None, :]]
    return out.contiguous(memory_format=torch.channels_last)


# -- matrices -----------------------------------------------------------------------------


def identity(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(n, 3, 3).clone()


def _where(mask: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None, None], matrix, identity(len(matrix), matrix.device))


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Sampling matrices for rotations by ``angles`` (radians)."""
    cos, sin = angles.cos(), angles.sin()
    matrix = identity(len(angles), angles.device)
    matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1] = cos, -sin, sin, cos
    return matrix


def scale_matrix(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    matrix = identity(len(sx), sx.device)
    matrix[:, 0, 0], matrix[:, 1, 1] = sx, sy
    return matrix


def translation_matrix(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    matrix = identity(len(tx), tx.device)
    matrix[:, 0, 2], matrix[:, 1, 2] = tx, ty
    return matrix


def shear_matrix(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    matrix = identity(len(sx), sx.device)
    matrix[:, 0, 1], matrix[:, 1, 0] = sx, sy
    return matrix


def random_flips(generator, n, horizontal: float, vertical: float) -> torch.Tensor:
    """Left-right and top-bottom mirror matrices, each with its probability."""
    sx = torch.where(_chance(generator, n, horizontal), -1.0, 1.0)
    sy = torch.where(_chance(generator, n, vertical), -1.0, 1.0)
    return scale_matrix(sx, sy)


def random_dihedral(generator, n, p: float) -> torch.Tensor:
    """One of the 8 symmetries of the square with probability ``p``, as matrices."""
    bits = torch.randint(0, 8, (n,), generator=generator, device=generator.device)
    bits = torch.where(_chance(generator, n, p), bits, torch.zeros_like(bits))
    transpose = identity(n, generator.device)
    transpose[:, :2, :2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=generator.device)
    matrix = torch.where((bits & 1 > 0)[:, None, None], transpose, identity(n, generator.device))
    flips = scale_matrix(torch.where(bits & 2 > 0, -1.0, 1.0),
                         torch.where(bits & 4 > 0, -1.0, 1.0))
    return flips @ matrix


def random_shift(generator, n, pad: int, size: int) -> torch.Tensor:
    """Whole-pixel moves of up to ``pad`` pixels of a ``size``-pixel image, as matrices."""
    offsets = torch.randint(-pad, pad + 1, (2, n), generator=generator, device=generator.device)
    return translation_matrix(*(offsets.float() * (2.0 / size)))


def random_rotation(generator, n, degrees: float, p: float) -> torch.Tensor:
    angles = _uniform(generator, n, -degrees, degrees) * (math.pi / 180)
    return _where(_chance(generator, n, p), rotation_matrix(angles))


def random_zoom(generator, n, low: float, high: float, p: float) -> torch.Tensor:
    """Zoom by a factor in [low, high] (> 1 magnifies): the sampling grid shrinks by it."""
    factor = _uniform(generator, n, low, high)
    return _where(_chance(generator, n, p), scale_matrix(1 / factor, 1 / factor))


def random_translation(generator, n, fraction: float, p: float) -> torch.Tensor:
    """Move by up to ``fraction`` of the image's side on each axis."""
    tx, ty = (_uniform(generator, n, -2 * fraction, 2 * fraction) for _ in range(2))
    return _where(_chance(generator, n, p), translation_matrix(tx, ty))


def random_perspective(generator, n, distortion: float, p: float) -> torch.Tensor:
    """Each corner moved by up to ``distortion`` of the side, towards or away from the centre."""
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]],
                           device=generator.device).expand(n, 4, 2)
    offsets = (torch.rand(n, 4, 2, generator=generator, device=generator.device) * 2 - 1)
    moved = corners + offsets * 2 * distortion
    matrix = get_perspective_transform(corners, moved)
    return _where(_chance(generator, n, p), matrix)


def random_resized_crop(generator, n, area: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style crop: a box of ``area`` fraction and aspect ``ratio`` (log-uniform),
    placed uniformly inside the image, stretched to the output."""
    fraction = _uniform(generator, n, *area)
    log_ratio = _uniform(generator, n, math.log(ratio[0]), math.log(ratio[1]))
    width = (fraction * log_ratio.exp()).sqrt().clamp(max=1.0)
    height = (fraction / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = _uniform(generator, n, -1, 1) * (1 - width)
    cy = _uniform(generator, n, -1, 1) * (1 - height)
    return translation_matrix(cx, cy) @ scale_matrix(width, height)


# -- resampling ---------------------------------------------------------------------------


def _base_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=device)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1)


def warp(x: torch.Tensor, matrices: torch.Tensor, size: int | None = None,
         padding: str = "reflection") -> torch.Tensor:
    """Resample each image once through its sampling matrix, to ``size`` x ``size``."""
    height = width = size or x.shape[-1]
    matrices = matrices.to(x.device, x.dtype)
    base = _base_grid(height, width, x.device).to(x.dtype)
    if (matrices[:, 2, :2] == 0).all() and (matrices[:, 2, 2] == 1).all():  # affine: no divide
        grid = torch.matmul(base.view(1, -1, 3), matrices[:, :2, :].transpose(1, 2))
        grid = grid.view(len(x), height, width, 2)
    else:
        points = torch.einsum("bij,hwj->bhwi", matrices, base)
        grid = points[..., :2] / points[..., 2:].clamp(min=1e-6)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased resize of a square batch (validation batches, progressive resizing)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)
