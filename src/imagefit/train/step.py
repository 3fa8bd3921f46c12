"""One training step, in the parts every trainer of the package shares: the forward pass
with the fit's autocast and memory format and the loss on its float32 outputs
(``forward_loss``), the backward pass of an ``accumulate``'th of it (``backward``) and the
update: unscale (fp16), clip, step, zero the gradients (``optimizer_step``). The learner
(and through it the LR finder) runs them with its events and its bf16 redo between them;
check's one-batch overfit, the head trained on precomputed features, the memory probe and
the timing of a wider net run them whole (``training_step``), so each sees the arithmetic
of the fit it stands for."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .. import models
from ..devices import autocast
from ..forward import memory_format_of

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def forward_loss(model: nn.Module | Callable, x: torch.Tensor, y: torch.Tensor, loss: Loss,
                 precision: str = "fp32", memory_format: torch.memory_format | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a batch and its loss (computed on the float32 outputs), in the autocast
    of ``precision`` and the model's memory format (give ``memory_format`` for a wrapper such
    as DDP or a compiled model)."""
    if memory_format is None:
        memory_format = memory_format_of(model)
    with autocast(precision, x.device):
        outputs = model(x.contiguous(memory_format=memory_format))
        return outputs, loss(outputs.float(), y)


def backward(loss: torch.Tensor, accumulate: int = 1,
             scaler: torch.amp.GradScaler | None = None) -> None:
    """Add the gradients of ``loss / accumulate`` (scaled for fp16)."""
    loss = loss / accumulate
    scaler.scale(loss).backward() if scaler else loss.backward()


def optimizer_step(parameters: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
                   grad_clip: float = 0.0, scaler: torch.amp.GradScaler | None = None) -> None:
    """A step's update: unscale (fp16), clip the gradients' norm to ``grad_clip`` (0: not at
    all), step and zero the gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss,
                  optimizer: torch.optim.Optimizer, *, precision: str = "fp32",
                  memory_format: torch.memory_format | None = None, grad_clip: float = 0.0,
                  scaler: torch.amp.GradScaler | None = None,
                  skip_non_finite: bool = False) -> torch.Tensor:
    """One whole step on a batch; its loss, detached. ``skip_non_finite``: a loss that is
    NaN or infinite is returned without a backward pass or an update (a step on it would
    make every weight NaN)."""
    _, value = forward_loss(model, x, y, loss, precision, memory_format)
    if skip_non_finite and not bool(torch.isfinite(value.detach())):
        return value.detach()
    backward(value, scaler=scaler)
    optimizer_step(model.parameters(), optimizer, grad_clip, scaler)
    return value.detach()


def training_images_per_second(model: nn.Module, shape: tuple[int, int, int], n_out: int,
                               device: torch.device, batch_size: int = 128, warmup: int = 2,
                               timed: int = 5, precision: str = "fp32") -> float:
    """Images a second that ``model`` trains on (random batches, channels-last, SGD with
    momentum, ``training_step`` in ``precision`` as the fit's steps are), after ``warmup``
    untimed steps. Draws from torch's global random state: seed it afterwards. (Not
    torch.utils.benchmark.Timer: importing it logs a CUDA warning on machines without one.)"""
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    images = torch.randn(batch_size, *shape, device=device)
    targets = torch.randint(0, n_out, (batch_size,), device=device)
    started = 0.0
    for step in range(warmup + timed):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        training_step(model, images, targets, nn.functional.cross_entropy, optimizer,
                      precision=precision, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return timed * batch_size / max(time.perf_counter() - started, 1e-9)



def net_for_budget(narrow: str, seconds: float, n_train: int, shape: tuple[int, int, int],
                   n_out: int, device: torch.device, batch_size: int = 128,
                   world_size: int = 1, precision: str = "fp32") -> tuple[str, float]:
    """The net a --budget fit of the small-image recipe trains: ``narrow`` (small_cnn_16),
    or ``WIDER_NET`` when ``seconds`` hold ``WIDER_FROM_EPOCHS`` epochs of it over
    ``n_train`` images, as estimated from a few of its training steps timed here (about a
    quarter of a second on 2 CPU cores). Also the epochs estimated."""
    wider = models.WIDER_NET  # the thresholds read from models, where they are measured
    per_second = training_images_per_second(models.MODELS[wider](shape[0], n_out), shape,
                                            n_out, device, batch_size, precision=precision)
    epochs = seconds * models.TRAINING_SHARE * per_second * world_size / max(n_train, 1)
    return (wider if epochs >= models.WIDER_FROM_EPOCHS else narrow), epochs
