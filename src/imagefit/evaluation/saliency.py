"""Saliency maps of a trained model, computed with captum: Grad-CAM shows where in the image
the evidence for a class lies (coarse, from a feature map), guided backpropagation (the
rule of ``guided``, for every activation) which pixels move the output."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from ..config import MIN_CAM_SIDE, SaliencyMethod
from ..errors import ImagefitError
from ..forward import run_model
from ..models.heads import WithHead
from ..tasks import Task
from .guided import GuidedBackprop
from .inference import LoadedModel

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
        with torch.no_grad(), evaluating(model):
            model(torch.zeros(1, channels, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: sides[name] for name in names if name in sides}


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
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
    return task.default_targets(outputs)


def saliency_maps(loaded: LoadedModel, images: torch.Tensor, method: SaliencyMethod = "gradcam",
                  targets: Sequence[int] | torch.Tensor | None = None, *,
                  layer: str | None = None, batch_size: int = 32) -> torch.Tensor:
    """Maps (N, H, W) in [0, 1] of uint8 images (N, C, H, W, as the loader gives them) for
    the outputs ``targets`` (default: each image's predicted class), each stretched to span
    [0, 1] (a Grad-CAM map without positive evidence stays zero). The model is left as it
    was: same modes, no hooks, no gradients.

    Guided backprop is ``imagefit.guided``'s: every activation module (ReLU, GELU, SiLU,
    Mish, ...; captum's hooks ``nn.ReLU`` only, which left the GELU/SiLU models with the
    plain gradient) passes back ``f'(x) * clamp(grad_out, min=0)`` where its input is
    positive and nothing elsewhere; on ReLU models that is captum's ``GuidedBackprop``. The
    map is the positive part of the largest guided gradient over the channels, as in the
    reference. Measured with bench/saliency_focus.py (default small CNN, Fashion-MNIST; mass
    on the image's own object over mass on another image's object region, a centred blob
    1.00): 1.57, against 0.85 for the plain gradient's magnitude; summing the magnitude of
    the guided gradient instead gave 0.64 (its negative part lies beside the object), the
    plain gradient's positive part 0.84, the rule without the mask on ``x`` or with a
    ReLU's slope 1.56 (within 0.015). Guided maps barely depend on the target (the top two
    classes' maps correlate 0.94, Grad-CAM's -0.06): they show what the net sees, Grad-CAM
    what decides the class."""
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
        explainer = GuidedBackprop(model)  # imagefit.guided's: the rule on every activation
    else:
        raise ImagefitError(f"unknown method '{method}': use gradcam or guided-backprop")
    maps = []
    with evaluating(model), torch.enable_grad(), warnings.catch_warnings():
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
    """Unscaled, non-negative maps (N, H, W) of one batch. Guided backprop's is the largest
    guided gradient over the channels, kept where positive (pixels whose brightening raises
    the output), as in the reference; see ``saliency_maps`` for why not its magnitude."""
    if isinstance(explainer, LayerGradCam):
        cam = explainer.attribute(x, target=targets, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return cam[:, 0].detach().clamp_min(0)
    guided = explainer.attribute(x.requires_grad_(), target=targets).detach()
    return guided.amax(dim=1).clamp_min(0)


def describe_outputs(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> list[str]:
    """Title per image: the prediction and its probability (or value), and the explained
    class when it is another."""
    activated = task.activate(outputs)
    return [task.describe_output(values, target)
            for values, target in zip(activated, targets.tolist())]


@torch.no_grad()
def loaded_outputs(loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """Raw outputs of one batch of uint8 images (N, C, S, S) held in memory, in the loaded
    model's pipeline and precision (``forward.model_outputs`` reads rows of a cache)."""
    device = next(loaded.model.parameters()).device
    with evaluating(loaded.model):
        return run_model(loaded.model, loaded.pipeline(images.to(device)),
                         loaded.precision).cpu()
