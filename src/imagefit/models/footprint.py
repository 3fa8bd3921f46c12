"""What a model's training step holds in memory, measured without spending any: the model is
built on PyTorch's meta device (shapes, no storage) and run forward once there, and the
outputs of its layers, which backward keeps, are summed. A preflight asks this before
anything is cached or trained (``workflows/preflight.py``); it takes well under a second.

Measured against the peak memory of real CPU training steps (forward, backward and an AdamW
step, fp32, weights and optimizer state included): a step took 0.58-1.32 times batch x the
summed outputs (resnet18 at 224 and 448 px 0.8, resnet50 0.95, efficientnet_b0 1.0,
convnext_tiny 0.73, vit_small 0.58, mobilenetv3_small 0.99, small_cnn 1.19-1.32). The
estimate counts the outputs once, plus the weights with their gradients and two optimizer
moments, plus three float copies of the input batch (the pipeline's float, augmented and
normalized batches): a step refused would have needed about that much or more, and one
passed may need up to a third more than estimated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import create_model
from .text import create_text_model

OPTIMIZER_COPIES = 4  # weights, gradients and two moments (AdamW), 4 bytes each
INPUT_COPIES = 3 * 4  # the float batch, augmented and normalized
PROBE_SIDE = 64  # convolutional nets are measured here and scaled by pixels (64 px and
# 224 px gave the same bytes a pixel within 1%)
# Where a model cannot run on the meta device: convnext_tiny's bytes per input value, the
# largest of the nets measured above (resnet18: 239, resnet50: 925, vit_small: 784)
FALLBACK_BYTES_PER_INPUT = 1300.0


@dataclass(frozen=True)
class Footprint:
    """A model's memory: the bytes its layers' outputs take per input value (a pixel of one
    channel, a character) of one example, and its parameters' bytes."""

    bytes_per_input: float
    parameter_bytes: int

    def step_bytes(self, batch_size: int, input_values: int) -> int:
        """Memory of a training step on ``batch_size`` examples of ``input_values`` each."""
        per_example = (self.bytes_per_input + INPUT_COPIES) * input_values
        return int(batch_size * per_example + OPTIMIZER_COPIES * self.parameter_bytes)


def image_model_footprint(name: str, channels: int, n_out: int, size: int,
                          **options) -> Footprint:
    """The footprint of ``create_model(name, channels, n_out, **options)`` (no pretrained
    weights are read): measured at 64 px and at ``size`` itself, the first that runs (a
    vision transformer takes only its own size)."""
    def build() -> nn.Module:
        return create_model(name, channels, n_out, **options)

    sides = dict.fromkeys((min(size, PROBE_SIDE), size))
    return _footprint(build, [torch.empty(2, channels, side, side, device="meta")
                              for side in sides])


def text_model_footprint(name: str, vocabulary_size: int, n_out: int,
                         length: int) -> Footprint:
    """The footprint of a text model reading ``length`` characters (measured at up to 64,
    scaled by length)."""
    def build() -> nn.Module:
        return create_text_model(name, vocabulary_size, n_out)

    probe = min(length, PROBE_SIDE)
    return _footprint(build, [torch.empty(2, probe, dtype=torch.int64, device="meta")])


# a size the model does not take, or an operation the meta device lacks
NOT_ON_META = (RuntimeError, AssertionError, NotImplementedError, ValueError, TypeError)


def _footprint(build: Callable[[], nn.Module], examples: list[torch.Tensor]) -> Footprint:
    try:
        with torch.device("meta"):
            model = build()
    except NOT_ON_META:
        return Footprint(FALLBACK_BYTES_PER_INPUT, 0)
    model.train()
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    for example in examples:
        try:
            outputs = _summed_outputs(model, example)
        except NOT_ON_META:
            continue
        return Footprint(outputs / example.numel(), parameters)
    return Footprint(FALLBACK_BYTES_PER_INPUT, parameters)


def _summed_outputs(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module in one forward pass of ``example``."""
    total = 0

    def add(module, inputs, output) -> None:
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()

    leaves = [module for module in model.modules() if next(module.children(), None) is None]
    handles = [module.register_forward_hook(add) for module in leaves]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return total
