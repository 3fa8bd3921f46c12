"""GPU memory: recognizing an out-of-memory error, and the largest batch whose training step
fits (``--bs auto``)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ImagefitError
from .optim import make_optimizer
from .step import training_step


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, or another backend's RuntimeError that says so."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


def largest_batch_size(model: nn.Module, input_shape: tuple[int, int, int], start: int, *,
                       optimizer: str = "adamw", precision: str = "fp32",
                       memory_format: torch.memory_format = torch.channels_last) -> int:
    """The largest power of two up to ``start`` (itself a power of two) whose training step,
    forward, backward and optimizer step on a random batch of ``input_shape`` (C, H, W), fits
    in the memory of ``model``'s device; halves from ``start`` until one does. The model's
    weights and buffers are left as they were."""
    saved = {name: value.detach().to("cpu", copy=True)
             for name, value in model.state_dict().items()}
    was_training = model.training
    model.train()
    size = start
    try:
        while not _step_fits(model, size, input_shape, optimizer, precision, memory_format):
            if size == 1:
                raise ImagefitError("a training step on one image does not fit in the GPU's "
                                    "memory: choose a smaller --model or --image-size")
            size //= 2
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
        _free(model)
    return size


def _step_fits(model: nn.Module, size: int, input_shape: tuple[int, int, int],
               optimizer: str, precision: str, memory_format: torch.memory_format) -> bool:
    device = next(model.parameters()).device
    try:
        step = make_optimizer(model, optimizer, 1e-4, 0.0)
        x = torch.randn(size, *input_shape, device=device)
        training_step(model, x, x, _mean_output, step, precision=precision,
                      memory_format=memory_format)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return True
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
    _free(model)  # outside the handler, once the error's frames no longer hold the tensors
    return False


def _mean_output(outputs: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """A loss of the outputs alone: the probe needs the backward pass, not a target."""
    return outputs.mean()


def _free(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.grad = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
