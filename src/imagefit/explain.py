"""Saliency maps of a trained model, computed with captum: Grad-CAM shows where in the image
the evidence for a class lies (a convolutional feature map weighted by its gradient),
guided backpropagation which pixels move the output. ``explain`` draws them over image files.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam
from torch import nn

from . import runs
from .config import MIN_CAM_SIDE, ExplainOptions, SaliencyMethod, merge_options
from .data.cache import build_cache, warn_unreadable
from .devices import autocast
from .errors import ImagefitError
from .inference import LoadedModel, expand_inputs, load_model
from .models.heads import WithHead
from .report.overlays import save_saliency_overlays
from .tasks import Task

METHOD_TITLES = {"gradcam": "Grad-CAM", "guided-backprop": "guided backprop"}


def target_index(task: Task, name: str) -> int:
    """The output that explains class (or regression target) ``name``."""
    if name not in task.names:
        shown = ", ".join(task.names[:20]) + (f" ... ({task.n_out} in all)"
                                              if task.n_out > 20 else "")
        raise ImagefitError(f"unknown target class '{name}': the model knows {shown}")
    return task.names.index(name)


def feature_blocks(model: nn.Module) -> list[str]:
    """Names of the modules that end the model's stages, input to output (timm's
    ``feature_info``; imagefit's small CNN and ``WithHead`` describe theirs the same way)."""
    if isinstance(model, WithHead):
        return [f"body.{name}" for name in feature_blocks(model.body)]
    return [info["module"] for info in getattr(model, "feature_info", None) or []]


def gradcam_layer(model: nn.Module, image_size: int, channels: int) -> str:
    """The module Grad-CAM explains: the last feature block when its map is at least
    ``MIN_CAM_SIDE`` px wide, else the deepest block at least twice that (else the widest).

    Deeper maps are more class-specific but coarser. Measured on the small CNN and
    Fashion-MNIST (bench/saliency_focus.py): its last stage (4 px) gives a centred blob no
    more specific to the object than to another image's, the stage before (7 px) empty maps
    for a quarter of the images, the first stage (14 px) maps that follow the object."""
    sides = _map_sides(model, feature_blocks(model), image_size, channels)
    if not sides:
        raise ImagefitError(
            "Grad-CAM needs a convolutional feature map and this model has none that "
            "imagefit knows: name one with --layer, or use --method guided-backprop"
        )
    names = list(sides)
    if getattr(model, "cam_rule", None) == "deepest_wide_enough":
        # the stem-less small CNNs: their first stage is a single convolution deep, too
        # shallow to be class-specific (squares vs discs, test_explain: the stage at 7 px put
        # 3.8x the object's share of the mass on it, the first stage at 14 px 1.5x)
        wide = [name for name in names if sides[name] >= MIN_CAM_SIDE]
        return wide[-1] if wide else max(names, key=sides.get)
    if sides[names[-1]] >= MIN_CAM_SIDE:
        return names[-1]
    wide_enough = min(2 * MIN_CAM_SIDE, max(sides.values()))
    return [name for name in names if sides[name] >= wide_enough][-1]


def _map_sides(model: nn.Module, names: list[str], image_size: int,
               channels: int) -> dict[str, int]:
    """The short side of each named module's output on one blank image, for modules that
    give (N, C, H, W) maps, in the order of ``names``."""
    modules = dict(model.named_modules())
    sides: dict[str, int] = {}

    def record(name: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                sides[name] = min(output.shape[-2:])
        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in names]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), _evaluating(model):
            model(torch.zeros(1, channels, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: sides[name] for name in names if name in sides}


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, every module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def default_targets(task: Task, outputs: torch.Tensor) -> torch.Tensor:
    """The output to explain per image: the most probable class, or the first target."""
    if task.kind == "regression":
        return torch.zeros(len(outputs), dtype=torch.int64)
    return outputs.argmax(dim=1).cpu()


def saliency_maps(loaded: LoadedModel, images: torch.Tensor, method: SaliencyMethod = "gradcam",
                  targets: Sequence[int] | torch.Tensor | None = None, *,
                  layer: str | None = None, batch_size: int = 32) -> torch.Tensor:
    """Maps (N, H, W) in [0, 1] of uint8 images (N, C, H, W, as the loader gives them) for
    the outputs ``targets`` (default: each image's predicted class), each stretched to span
    [0, 1] (a Grad-CAM map without positive evidence stays zero). The model is left as it
    was: same modes, no hooks, no gradients.

    captum's guided backprop overrides the gradient of ``nn.ReLU`` modules only, so on GELU
    or SiLU models (the small CNN, ConvNeXt, EfficientNet) it is the plain input gradient.
    That is kept on purpose: applying the guided rule to the small CNN's GELUs moved its
    maps off the object (bench/saliency_focus.py: 38% of the mass on Fashion-MNIST's
    objects, against 49% for the plain gradient and 46% of the area)."""
    model = loaded.model
    device = next(model.parameters()).device
    if method == "gradcam":
        layer = layer or gradcam_layer(model, loaded.settings.size, loaded.settings.channels)
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ImagefitError(f"model has no module '{layer}': choose one of "
                                f"{', '.join(feature_blocks(model)) or 'its named modules'}")
        explainer = LayerGradCam(model, modules[layer])
    elif method == "guided-backprop":
        explainer = GuidedBackprop(model)
    else:
        raise ImagefitError(f"unknown method '{method}': use gradcam or guided-backprop")
    maps = []
    with _evaluating(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks")
        for start in range(0, len(images), batch_size):
            x = loaded.pipeline(images[start:start + batch_size].to(device))
            if targets is None:
                with torch.no_grad():
                    batch_targets = default_targets(loaded.task, model(x))
            else:
                batch_targets = torch.as_tensor(targets[start:start + batch_size])
            maps.append(_attribute(explainer, x, batch_targets.to(device)).cpu())
    maps = torch.cat(maps) if maps else torch.zeros(0, *images.shape[-2:])
    low = maps.amin(dim=(1, 2), keepdim=True)
    return (maps - low) / (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)


def _attribute(explainer, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Unscaled, non-negative maps (N, H, W) of one batch."""
    if isinstance(explainer, LayerGradCam):
        cam = explainer.attribute(x, target=targets, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return cam[:, 0].detach().clamp_min(0)
    return explainer.attribute(x.requires_grad_(), target=targets).detach().abs().sum(dim=1)


def describe_outputs(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> list[str]:
    """Title per image: the prediction and its probability (or value), and the explained
    class when it is another."""
    activated = task.activate(outputs)
    titles = []
    for values, target in zip(activated, targets.tolist()):
        if task.kind == "regression":
            titles.append(f"{task.names[target]} = {values[target].item():.3g}")
            continue
        predicted = int(values.argmax())
        title = f"{task.names[predicted]} {values[predicted].item():.0%}"
        if target != predicted:
            title += f"\nexplaining {task.names[target]} {values[target].item():.0%}"
        titles.append(title)
    return titles


def explain_images(loaded: LoadedModel, images: torch.Tensor, titles: Sequence[str] | None,
                   method: SaliencyMethod, out_path: str | Path,
                   targets: Sequence[int] | torch.Tensor | None = None, *,
                   layer: str | None = None, alpha: float = 0.5) -> Path:
    """One PNG with a saliency overlay beside each uint8 image (N, C, H, W); ``titles``
    default to the model's prediction for each image."""
    if titles is None or targets is None:
        outputs = model_outputs(loaded, images)
        targets = default_targets(loaded.task, outputs) if targets is None else targets
        titles = titles or describe_outputs(loaded.task, outputs, torch.as_tensor(targets))
    maps = saliency_maps(loaded, images, method, targets, layer=layer)
    return save_saliency_overlays(images, maps, titles, out_path, alpha=alpha,
                                  map_title=METHOD_TITLES[method])


@torch.no_grad()
def model_outputs(loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    device = next(loaded.model.parameters()).device
    with _evaluating(loaded.model), autocast(loaded.precision, device):
        return loaded.model(loaded.pipeline(images.to(device))).float().cpu()


def explain(run: str | Path, inputs: list[str | Path], out: str | Path,
            options: ExplainOptions | None = None, **overrides: Any) -> list[Path]:
    """A saliency overlay PNG per readable image of files, folders or CSVs of paths, written
    to the folder ``out`` as STEM_METHOD.png; returns their paths."""
    options = merge_options(ExplainOptions, options, overrides)
    out = runs.output_folder(out, "--out")
    loaded = load_model(run, options.device, options.precision)
    target = None if options.target is None else target_index(loaded.task, options.target)
    paths = expand_inputs(list(inputs), options)
    cache = build_cache(paths, loaded.settings, options.cache_dir, progress=options.progress)
    warn_unreadable(cache, paths)
    rows = np.setdiff1d(np.arange(len(paths)), cache.failed)
    names = _file_names([paths[row] for row in rows], options.method)
    layer = options.layer
    if options.method == "gradcam" and layer is None:
        layer = gradcam_layer(loaded.model, loaded.settings.size, loaded.settings.channels)
    out = Path(out)
    written = []
    for start in range(0, len(rows), options.bs):
        chunk = torch.as_tensor(rows[start:start + options.bs])
        images = cache.tensor().index_select(0, chunk).permute(0, 3, 1, 2)
        outputs = model_outputs(loaded, images)
        targets = (default_targets(loaded.task, outputs) if target is None
                   else torch.full((len(chunk),), target))
        maps = saliency_maps(loaded, images, options.method, targets, layer=layer,
                             batch_size=options.bs)
        titles = describe_outputs(loaded.task, outputs, targets)
        for index in range(len(chunk)):
            written.append(save_saliency_overlays(
                images[index:index + 1], maps[index:index + 1], titles[index:index + 1],
                out / names[start + index], alpha=options.alpha,
                map_title=METHOD_TITLES[options.method]))
    return written


def _file_names(paths: list[str], method: str) -> list[str]:
    """STEM_METHOD.png per path, numbered STEM-2_METHOD.png and on where stems repeat."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem, number = Path(path).stem, 1
        name = f"{stem}_{method}.png"
        while name in used:
            number += 1
            name = f"{stem}-{number}_{method}.png"
        used.add(name)
        names.append(name)
    return names
