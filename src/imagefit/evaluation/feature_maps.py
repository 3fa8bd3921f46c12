"""Feature maps: what one layer of a trained model computes for an image, channel by
channel, captured with a forward hook during the model's ordinary forward pass."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ImagefitError
from ..forward import run_model
from .inference import LoadedModel
from .saliency import evaluating, feature_blocks

SHOWN_NAMES = 6  # module names an unknown --layer's message suggests


def default_feature_layer(model: nn.Module) -> str:
    """The first feature block (timm's ``feature_info``, input to output): the largest map
    the model describes, where the channels still look like edges and strokes."""
    blocks = feature_blocks(model)
    if not blocks:
        raise ImagefitError("this model names no feature blocks: choose a module with --layer "
                            f"(such as {', '.join(_some_names(model))})")
    return blocks[0]


def module_named(model: nn.Module, layer: str) -> nn.Module:
    """The submodule ``layer`` (a name from ``model.named_modules()``)."""
    modules = dict(model.named_modules())
    if not layer or layer not in modules:
        raise ImagefitError(f"model has no module '{layer}': choose a name from "
                            f"model.named_modules(), such as {', '.join(_some_names(model))}")
    return modules[layer]


def _some_names(model: nn.Module) -> list[str]:
    """The feature blocks, else the first named modules, as examples of layer names."""
    names = feature_blocks(model) or [name for name, _ in model.named_modules() if name]
    return names[:SHOWN_NAMES]


@torch.no_grad()
def feature_maps(loaded: LoadedModel, images: torch.Tensor, layer: str | None = None,
                 batch_size: int = 32) -> torch.Tensor:
    """The output (N, C, H, W) of module ``layer`` (default: the first feature block) for
    uint8 images (N, C, H, W, as the loader gives them), as float32 on the CPU, computed in
    the model's precision; a module called more than once per pass gives its first call's.
    The model is left as it was: same modes, no hooks."""
    model = loaded.model
    layer = layer or default_feature_layer(model)
    module = module_named(model, layer)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            shape = (list(output.shape) if isinstance(output, torch.Tensor)
                     else type(output).__name__)
            raise ImagefitError(f"module '{layer}' gives {shape}, not feature maps "
                                "(N, C, H, W): choose a convolutional layer with --layer")
        captured.append(output)

    batches = []
    handle = module.register_forward_hook(keep)
    try:
        with evaluating(model):
            for start in range(0, len(images), batch_size):
                captured.clear()
                run_model(model, loaded.pipeline(images[start:start + batch_size].to(device)),
                          loaded.precision)
                batches.append(captured[0].float().cpu().contiguous())
    finally:
        handle.remove()
    return torch.cat(batches) if batches else torch.zeros(0, 0, 0, 0)
