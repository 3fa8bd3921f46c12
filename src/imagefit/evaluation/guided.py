"""Guided backpropagation (Springenberg et al. 2014) for every activation module that
imagefit's models use, not only ``nn.ReLU`` as captum's ``GuidedBackprop``.

The rule: on the way back to the input, each activation passes back only positive gradients
(evidence for the target), and only through units whose activation is positive (units that
detected their pattern). For ReLU that is ``clamp(grad wrt the ReLU's input, min=0)``. For a
smooth activation ``f`` (GELU, SiLU, Mish, ...) the plain backward pass gives
``f'(x) * grad_out``; the guided one gives::

    grad_in = f'(x) * clamp(grad_out, min=0) * [x > 0]

For every activation handled here (PReLU with a non-negative slope) ``f(x) > 0`` exactly
where ``x > 0``, and ``f'(x) > 0`` there (``>= 0`` for ReLU6), so this is also
``clamp(f'(x) * grad_out, min=0) * [f(x) > 0]``: both of the rule's masks, with the
activation's own slope where it passes. On ReLU it is exactly captum's guided backprop.
The other ways to carry the rule over drop a part of it: ``clamp(f'(x) * grad_out, min=0)``
or ``f'(x) * clamp(grad_out, min=0)`` without the mask let gradient through units that
did not fire (GELU and SiLU have a slope below zero), ``clamp(grad_out, min=0) * [x > 0]``
treats the activation as a ReLU. They measured close to it but below: 1.557, 1.563 and
1.556 against 1.569, the plain gradient 0.85 (bench/saliency_focus.py, the default small CNN
on Fashion-MNIST; mass on the image's own object over mass on another image's object region,
1.00 for a centred blob). The map's aggregation matters more: see ``saliency_maps``.

Each activation module gets a forward hook that reroutes its output through an autograd
function: it sees the call's own input ``x``, which the mask needs and a full backward hook
(given only the gradients) does not, once per call, so a module called twice in a forward
(torchvision's ResNet blocks) is handled too. ``f'(x)`` comes from autograd on a copy of
``x``. In-place activations are switched to out-of-place inside (they would overwrite ``x``)
and switched back after.

Limits: only activation *modules* are hooked. Activations called as functions inside a
module's ``forward`` (``F.gelu(x)``, ``x * x.sigmoid()``) cannot be reached by a hook, and
their gradient stays the plain one; ``GuidedBackprop`` refuses a model with no activation
module at all. Sigmoid, Tanh and hard-sigmoid modules gate or squash (squeeze-excitation,
attention) rather than detect a pattern, and are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from captum.attr import GradientAttribution, Saliency
from torch import nn

from ..errors import ImagefitError

GUIDED_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish,
)
# timm's own activation classes (timm.layers.activations and activations_me), known by name
# so that this module needs no timm: its GELU (ConvNeXt) is not an nn.GELU
GUIDED_TIMM_NAMES = frozenset({
    "GELU", "GELUTanh", "QuickGELU", "Swish", "SwishMe", "Mish", "MishMe", "HardSwish",
    "HardSwishMe", "HardMish", "HardMishMe",
})


def is_guided_activation(module: nn.Module) -> bool:
    """Whether guided backprop applies its rule to this module."""
    return isinstance(module, GUIDED_TYPES) or (
        type(module).__name__ in GUIDED_TIMM_NAMES and not any(module.children()))


class _GuidedGradient(torch.autograd.Function):
    """The activation's output on the way forward; on the way back, the guided gradient to
    its input: ``weight * clamp(grad_out, min=0)`` with ``weight = f'(x) * [x > 0]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output: torch.Tensor, weight: torch.Tensor):
        ctx.save_for_backward(weight)
        return output.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return weight * grad_out.clamp_min(0), None, None


def _guide(module: nn.Module, inputs: tuple, output: Any) -> Any:
    """Forward hook: the output, rerouted through ``_GuidedGradient`` (each call of the
    module on its own input, so modules called twice in a forward are handled too)."""
    if not (torch.is_grad_enabled() and inputs and isinstance(inputs[0], torch.Tensor)
            and isinstance(output, torch.Tensor) and output.requires_grad
            and inputs[0].requires_grad and output.shape == inputs[0].shape):
        return None
    x = inputs[0]
    # the activation is elementwise: a backward pass of ones through it gives f'(x); it runs
    # on a copy through ``forward`` (no hooks), so it reaches no hook on the model's tensors
    probe = x.detach().requires_grad_()
    (slope,) = torch.autograd.grad(module.forward(probe), probe, torch.ones_like(output))
    weight = slope * (probe.detach() > 0)
    return _GuidedGradient.apply(x, output.detach(), weight)


@contextmanager
def guided_activations(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Inside, the gradient through every activation module of ``model`` follows the guided
    rule; yields those modules. Their in-place flags are off inside (an in-place activation
    overwrites its input, which the rule needs) and every flag and hook is as before after."""
    modules = [module for module in model.modules() if is_guided_activation(module)]
    inplace = [(module, module.inplace) for module in modules
               if isinstance(getattr(module, "inplace", None), bool)]
    handles = []
    try:
        for module, _ in inplace:
            module.inplace = False
        handles = [module.register_forward_hook(_guide) for module in modules]
        yield modules
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in inplace:
            module.inplace = flag


class GuidedBackprop(GradientAttribution):
    """captum-style guided backpropagation: the input gradient of the target output with
    ``guided_activations`` in force (captum's ``Saliency`` computes it, signed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.model = model

    def attribute(self, inputs, target=None, additional_forward_args=None):
        with guided_activations(self.model) as modules:
            if not modules:
                raise ImagefitError(
                    "guided backprop found no activation module in this model (activations "
                    "called as functions cannot be hooked): use --method gradcam")
            return Saliency(self.model).attribute(
                inputs, target=target, abs=False, additional_forward_args=additional_forward_args)
