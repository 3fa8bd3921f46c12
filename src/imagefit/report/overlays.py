"""Saliency maps drawn over their images as PNG files."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from ..config import SaliencyMethod
from ..evaluation.inference import LoadedModel
from ..evaluation.saliency import (
    METHOD_TITLES,
    default_targets,
    describe_outputs,
    loaded_outputs,
    saliency_maps,
)
from .plots import plt, save_figure


def save_saliency_overlays(images: torch.Tensor, maps: torch.Tensor, titles: Sequence[str],
                           path: str | Path, *, alpha: float = 0.5,
                           map_title: str = "saliency") -> Path:
    """Each uint8 image (N, C, H, W) beside itself under its map (N, H, W in [0, 1]) as a
    semi-transparent heat map, titled with ``titles``; pairs fill a near-square grid."""
    count = len(images)
    pair_columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / pair_columns)
    figure, axes = plt.subplots(rows, 2 * pair_columns, figsize=(3.6 * pair_columns, 2.0 * rows),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index in range(count):
        row, column = divmod(index, pair_columns)
        original, overlay = axes[row, 2 * column], axes[row, 2 * column + 1]
        image = images[index].detach().cpu()
        shown = dict(cmap="gray", vmin=0, vmax=255) if image.shape[0] == 1 else {}
        picture = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
        for axis in (original, overlay):
            axis.imshow(picture.numpy(), interpolation="nearest", **shown)
        overlay.imshow(maps[index].detach().float().cpu().numpy(), cmap="jet", vmin=0, vmax=1,
                       alpha=alpha, interpolation="bilinear")
        original.set_title(titles[index], fontsize=8)
        overlay.set_title(map_title, fontsize=8)
    return save_figure(figure, path)


def explain_images(loaded: LoadedModel, images: torch.Tensor, titles: Sequence[str] | None,
                   method: SaliencyMethod, out_path: str | Path,
                   targets: Sequence[int] | torch.Tensor | None = None, *,
                   layer: str | None = None, alpha: float = 0.5) -> Path:
    """One PNG with a saliency overlay beside each uint8 image (N, C, H, W); ``titles``
    default to the model's prediction for each image."""
    if titles is None or targets is None:
        outputs = loaded_outputs(loaded, images)
        targets = default_targets(loaded.task, outputs) if targets is None else targets
        titles = titles or describe_outputs(loaded.task, outputs, torch.as_tensor(targets))
    maps = saliency_maps(loaded, images, method, targets, layer=layer)
    return save_saliency_overlays(images, maps, titles, out_path, alpha=alpha,
                                  map_title=METHOD_TITLES[method])


def overlay_png(image: torch.Tensor, saliency: torch.Tensor, alpha: float = 0.5) -> bytes:
    """One uint8 image (C, H, W) under its map (H, W in [0, 1]) as a jet heat map, as PNG
    bytes at the image's own size (the page scales it)."""
    picture = image.detach().cpu().numpy().transpose(1, 2, 0).astype(np.float32)
    if picture.shape[2] == 1:
        picture = picture.repeat(3, axis=2)
    heat = colormaps["jet"](saliency.detach().float().cpu().numpy())[..., :3] * 255.0
    blended = (1.0 - alpha) * picture + alpha * heat
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended.round(), 0, 255).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()
