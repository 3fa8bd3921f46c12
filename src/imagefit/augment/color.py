"""Colour and pixel transforms on float batches in [0, 1], per-sample parameters.

Brightness and contrast work on any number of channels; saturation and hue need RGB and leave
one-channel images unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: hue rotates the I/Q plane.
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                           [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]])


def _factors(generator, n: int, amount: float, p: float) -> torch.Tensor:
    """1 + U(-amount, amount) per sample, or 1 where the transform is not drawn."""
    values = 1 + (torch.rand(n, generator=generator, device=generator.device) * 2 - 1) * amount
    keep = torch.rand(n, generator=generator, device=generator.device) >= p
    return torch.where(keep, torch.ones_like(values), values)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(x.device, x.dtype)[:, None, None, None]


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB batch (B, 1, H, W); a grey batch as it is."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """other + factor * (x - other): factor 1 is x, 0 is other (PIL's ImageEnhance rule)."""
    return other + _per_sample(factor, x) * (x - other)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else blend(x, grey(x), factor)


def adjust_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``turns`` of the colour circle, as a linear map in YIQ space."""
    if x.shape[1] == 1:
        return x
    matrix = _hue_matrix(turns.to(x.device, x.dtype))
    return torch.einsum("bij,bjhw->bihw", matrix, x)


def color_jitter(x: torch.Tensor, generator: torch.Generator, *, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                 p: float = 1.0) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in 1 +- amount and a hue shift of
    up to ``hue`` turns, each drawn per image with probability ``p``.

    All four are linear in the pixel values, so they are fused: one 3x3 matrix and one offset
    per image, applied in a single pass (the image mean for contrast is taken once)."""
    n, channels = len(x), x.shape[1]
    if not (brightness or contrast or saturation or hue):
        return x
    fb = _factors(generator, n, brightness, p).to(x.device, x.dtype)
    fc = _factors(generator, n, contrast, p).to(x.device, x.dtype)
    fs = _factors(generator, n, saturation, p).to(x.device, x.dtype)
    turns = (_factors(generator, n, hue, p) - 1).to(x.device, x.dtype)
    mean_pixel = x.mean(dim=(2, 3))  # (n, channels)
    if channels == 1:
        scale = fb * fc
        offset = (1 - fc) * fb * mean_pixel[:, 0]
        return (x * scale[:, None, None, None] + offset[:, None, None, None]).clamp_(0, 1)
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    luma = torch.tensor(LUMA, device=x.device, dtype=x.dtype)
    matrix = eye * fb[:, None, None]
    if saturation:
        grey_rows = luma.expand(3, 3)  # every output channel takes the luma
        saturate = fs[:, None, None] * eye + (1 - fs)[:, None, None] * grey_rows
        matrix = saturate @ matrix
    if hue:
        matrix = _hue_matrix(turns) @ matrix
    grey_mean = (matrix @ mean_pixel[:, :, None])[:, :, 0] @ luma  # (n,)
    matrix = matrix * fc[:, None, None]
    offset = ((1 - fc) * grey_mean)[:, None].expand(n, 3)
    out = torch.baddbmm(offset[:, :, None], matrix, x.reshape(n, 3, -1))
    return out.view_as(x).clamp_(0, 1)


def _hue_matrix(turns: torch.Tensor) -> torch.Tensor:
    """Per-image RGB matrices rotating hue by ``turns`` of the circle in YIQ space."""
    angle = turns * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(len(turns), 3, 3, device=turns.device, dtype=turns.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = (
        cos, -sin, sin, cos)
    to_yiq = RGB_TO_YIQ.to(turns.device, turns.dtype)
    return torch.linalg.inv(to_yiq) @ rotation @ to_yiq


def pca_statistics(images: np.ndarray, max_pixels: int = 1_000_000,
                   seed: int = 0) -> dict[str, list]:
    """Eigenvalues and eigenvectors of the RGB covariance of uint8 (N, H, W, 3) images on the
    0..1 scale, for AlexNet-style lighting noise."""
    pixels = images.reshape(-1, images.shape[-1])
    if len(pixels) > max_pixels:
        rows = np.random.default_rng(seed).choice(len(pixels), max_pixels, replace=False)
        pixels = pixels[np.sort(rows)]
    values, vectors = np.linalg.eigh(np.cov(pixels.astype(np.float64).T / 255.0))
    return {"eigenvalues": values.tolist(), "eigenvectors": vectors.tolist()}


def pca_lighting(x: torch.Tensor, generator: torch.Generator, statistics: dict,
                 sigma: float = 0.1) -> torch.Tensor:
    """Add eigenvectors @ (alpha * eigenvalues) to every pixel, alpha ~ N(0, sigma) per image
    and component (RGB only)."""
    if x.shape[1] != 3 or not sigma:
        return x
    values = torch.tensor(statistics["eigenvalues"], device=x.device, dtype=x.dtype)
    vectors = torch.tensor(statistics["eigenvectors"], device=x.device, dtype=x.dtype)
    alpha = torch.randn(len(x), 3, generator=generator, device=generator.device) * sigma
    shift = (alpha.to(x.device, x.dtype) * values) @ vectors.T
    return (x + shift[:, :, None, None]).clamp(0, 1)


def _boxes(generator, n: int, height: int, width: int, area: tuple[float, float],
           ratio: tuple[float, float]):
    """Random boxes (top, left, bottom, right) in pixels, one per image."""
    fraction = torch.rand(n, generator=generator, device=generator.device) * (
        area[1] - area[0]) + area[0]
    log_ratio = torch.rand(n, generator=generator, device=generator.device) * (
        math.log(ratio[1]) - math.log(ratio[0])) + math.log(ratio[0])
    box_h = (fraction * height * width / log_ratio.exp()).sqrt().clamp(1, height)
    box_w = (fraction * height * width * log_ratio.exp()).sqrt().clamp(1, width)
    top = torch.rand(n, generator=generator, device=generator.device) * (height - box_h)
    left = torch.rand(n, generator=generator, device=generator.device) * (width - box_w)
    return top, left, top + box_h, left + box_w


def box_mask(x: torch.Tensor, top, left, bottom, right) -> torch.Tensor:
    """(B, 1, H, W) boolean mask of each image's box."""
    rows = torch.arange(x.shape[2], device=x.device)[None, :, None]
    cols = torch.arange(x.shape[3], device=x.device)[None, None, :]
    to = lambda v: v.to(x.device)[:, None, None]  # noqa: E731
    inside = ((rows >= to(top)) & (rows < to(bottom)) & (cols >= to(left)) & (cols < to(right)))
    return inside[:, None]


def random_erase(x: torch.Tensor, generator: torch.Generator, *, p: float = 0.5,
                 count: int = 1, area: tuple[float, float] = (0.02, 0.25),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Cutout / random erasing: up to ``count`` boxes per image, each with probability ``p``,
    filled with uniform noise."""
    n, _, height, width = x.shape
    for _ in range(count):
        chosen = torch.rand(n, generator=generator, device=generator.device) < p
        mask = box_mask(x, *_boxes(generator, n, height, width, area, ratio))
        mask &= chosen.to(x.device)[:, None, None, None]
        noise = torch.rand(x.shape, generator=generator, device=generator.device)
        x = torch.where(mask, noise.to(x.device, x.dtype), x)
    return x


def sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL-style sharpness: blend with a 3x3 smoothed copy (factor > 1 sharpens)."""
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]],
                          device=x.device, dtype=x.dtype) / 13
    channels = x.shape[1]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"),
                      kernel.expand(channels, 1, 3, 3), groups=channels)
    return blend(x, smooth, factor).clamp(0, 1)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each image's channels to the full 0..1 range."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 1 / (high - low).clamp(min=1e-6), torch.ones_like(high))
    return torch.where(high > low, (x - low) * scale, x)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep ``bits`` (1..8) bits of each 8-bit value; 8 bits leaves the image as it is."""
    bits = _per_sample(bits, x)
    step = 256 / 2**bits
    quantized = (torch.floor(x * 255 / step) * step / 255).clamp(0, 1)
    return torch.where(bits >= 8, x, quantized)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert values above ``threshold`` (1 leaves the image as it is)."""
    return torch.where(x > _per_sample(threshold, x), 1 - x, x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per image and channel (kornia's batched implementation)."""
    from kornia.enhance import equalize as kornia_equalize

    return kornia_equalize(x.contiguous())
