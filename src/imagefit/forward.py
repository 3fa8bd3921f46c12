"""The one forward pass: a model over batches of cached images, as validation, the final
evaluation, ``evaluate``, ``predict`` and ``explain`` all run it. Each batch goes through
the model's pipeline (uint8 to normalized float at the training size), in the memory order of
the model's weights and under the autocast of the precision it trained in; with test-time
augmentation the outputs are the average over the original and its versions.

``run_model`` is one batch; ``loader_outputs`` a loader's batches (and their targets);
``model_outputs`` the rows of an image tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .augment.pipeline import BatchPipeline
from .augment.presets import resolve_augment
from .config import AugmentOptions
from .data.loader import Loader
from .devices import autocast
from .tasks import Task


@dataclass
class TTA:
    """Test-time augmentation: ``n`` versions of each image made with ``augment``, averaged
    with the original (probabilities for classes, values for regression)."""

    n: int = 4
    augment: AugmentOptions = field(default_factory=lambda: resolve_augment("light"))
    seed: int = 0

    @classmethod
    def from_options(cls, options: Any, trained: AugmentOptions | dict | None) -> TTA | None:
        """The TTA that ``options`` ask for (None when off); ``trained`` is the model's
        training augmentation, which ``--tta-augment auto`` reuses."""
        if not options.tta:
            return None
        if options.tta_augment == "flip":  # the mirror image: one version is all there is
            return cls(1, AugmentOptions(flip=1.0))
        return cls(options.tta_n, tta_augment(options.tta_augment, trained))


def tta_augment(preset: str, trained: AugmentOptions | dict | None) -> AugmentOptions:
    """The augmentation of the TTA versions: a preset, 'flip' (each image mirrored), or
    (auto) the label-preserving part of the training augmentation, or light when training
    used none."""
    if preset == "flip":
        return AugmentOptions(flip=1.0)
    if preset != "auto":
        return resolve_augment(preset)
    if trained:
        options = AugmentOptions.model_validate(trained) if isinstance(trained, dict) \
            else trained
        options = options.model_copy(update={"mixup": 0.0, "cutmix": 0.0, "erase_p": 0.0,
                                             "mix_off_epochs": 0, "lighting": 0.0})
        if options != AugmentOptions():
            return options
    return resolve_augment("light")


class Average:
    """The average of raw outputs of the same images (test-time augmentation's versions, an
    ensemble's members) taken as the task averages them (probabilities of classes and
    labels, values for regression: ``Task.averageable``), given back as raw-like outputs
    that the loss, the metrics and ``Task.activate`` take (``Task.from_average``). One part
    is its own average, given back as it came."""

    def __init__(self, task: Task) -> None:
        self.task, self.first, self.total, self.count = task, None, None, 0

    def add(self, raw: torch.Tensor) -> None:
        if self.first is None:  # averaged only once a second part comes
            self.first = raw
        else:
            if self.total is None:
                self.total = self.task.averageable(self.first)
            self.total = self.total + self.task.averageable(raw)
        self.count += 1

    def outputs(self) -> torch.Tensor:
        if self.count == 1:
            return self.first
        return self.task.from_average(self.total / self.count)


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """The memory order of the model's convolution weights: batches go in the same. The
    first weight whose order can be told is asked: one of a single input channel (a grey
    model's first convolution) is contiguous in both orders."""
    for weight in model.parameters():
        if weight.dim() != 4:
            continue
        last = weight.is_contiguous(memory_format=torch.channels_last)
        if last != weight.is_contiguous():
            return torch.channels_last if last else torch.contiguous_format
    return torch.contiguous_format


def run_model(model: nn.Module | Any, x: torch.Tensor, precision: str = "fp32",
              memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """Float32 outputs of one normalized batch, in the model's memory order and precision
    (``model`` may be any callable, such as a DDP or compiled wrapper; give ``memory_format``
    then)."""
    if memory_format is None:
        memory_format = memory_format_of(model)
    with autocast(precision, x.device):
        return model(x.contiguous(memory_format=memory_format)).float()


@torch.no_grad()
def loader_outputs(model: nn.Module, pipeline: BatchPipeline, task: Task, loader: Loader, *,
                   size: int | None = None, precision: str = "fp32", tta: TTA | None = None,
                   plain_too: bool = False, call: Any = None,
                   memory_format: torch.memory_format | None = None) -> dict[str, torch.Tensor]:
    """Raw outputs of every batch of ``loader`` in its order, gathered from every rank, on
    the CPU: ``{"outputs", "targets"}`` and, with ``tta`` and ``plain_too``, ``"plain"`` (the
    original's own outputs: one pass gives both). ``call`` runs the model (a DDP or compiled
    wrapper of it) where given. The model is left in the mode it was in."""
    call = model if call is None else call
    memory_format = memory_format_of(model) if memory_format is None else memory_format
    was_training = model.training
    model.eval()
    augmenter = generator = None
    if tta is not None and tta.n:
        augmenter = BatchPipeline(pipeline.mean.flatten().tolist(),
                                  pipeline.std.flatten().tolist(), tta.augment)
        generator = torch.Generator(loader.device).manual_seed(tta.seed)
    outputs, plain, targets = [], [], []
    for x, y in loader:
        raw = run_model(call, pipeline(x, size=size), precision, memory_format)
        plain.append(raw.cpu())
        targets.append(y.cpu())
        if augmenter is None:
            outputs.append(raw.cpu())
            continue
        average = Average(task)
        average.add(raw)
        for _ in range(tta.n):
            version = augmenter.augment_batch(x.float().div_(255.0), generator, size)
            average.add(run_model(call, augmenter.normalize(version), precision, memory_format))
        outputs.append(average.outputs().cpu())
    model.train(was_training)
    empty = torch.zeros(0, task.n_out)
    result = {"outputs": loader.gather(torch.cat(outputs)) if outputs else empty,
              "targets": loader.gather(torch.cat(targets)) if targets else torch.zeros(0)}
    if plain_too:
        result["plain"] = loader.gather(torch.cat(plain)) if plain else empty
    return result


def model_outputs(model: nn.Module, pipeline: BatchPipeline, task: Task, images: torch.Tensor,
                  rows: np.ndarray, batch_size: int, tta: TTA | None = None,
                  size: int | None = None, rank: int = 0, world_size: int = 1,
                  plain_too: bool = False, precision: str = "fp32",
                  counts: list[int] | None = None, places: torch.Tensor | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Raw outputs of ``model`` for ``images[rows]`` (uint8 NHWC), in order, on the CPU; with
    ``tta`` the average over the original and the augmented versions (and, ``plain_too``,
    the original's own outputs first). With ``world_size`` above 1, each rank computes its
    share and every rank gets them all. ``precision``: the autocast the model was trained
    in, so that these outputs are the ones its validation saw. ``counts``: ``rows`` are this
    rank's own share of sharded data (``Loader``), ``counts`` every rank's number, ``places``
    where ``images`` holds them."""
    if len(rows) == 0 and counts is None:
        empty = torch.zeros(0, task.n_out)
        return (empty, empty) if plain_too else empty
    device = next(model.parameters(), torch.zeros(0)).device
    rows_in_all = len(images) if places is None else len(places)
    loader = Loader(images, torch.zeros(rows_in_all), rows, batch_size, device=device,
                    rank=rank, world_size=world_size, counts=counts, places=places)
    result = loader_outputs(model, pipeline, task, loader, size=size, precision=precision,
                            tta=tta, plain_too=plain_too)
    if plain_too:
        return result["plain"], result["outputs"]
    return result["outputs"]
