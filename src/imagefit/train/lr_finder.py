"""The LR finder: an exponential sweep of the learning rate over a few hundred steps, the
smoothed loss it gives, and suggestions read from the curve. The model is restored after."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .optim import make_optimizer


@dataclass
class LRFinderResult:
    """Learning rates tried, their smoothed losses, and the suggested rates by rule:
    'steepest' (fastest fall of the loss), 'valley' (inside the longest fall) and
    'minimum/10' (a tenth of the rate at the lowest loss)."""

    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float] = field(default_factory=dict)


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Read the suggestions off a smoothed loss curve."""
    log_lrs = np.log10(lrs)
    values = np.asarray(losses)
    minimum = int(np.argmin(values))
    # slope over a window of 5% of the points, so that early noise does not win
    k = max(1, len(values) // 20)
    centres = np.arange(k, max(minimum, k + 1))
    centres = centres[centres + k < len(values)]
    if len(centres):
        slopes = (values[centres + k] - values[centres - k]) / (
            log_lrs[centres + k] - log_lrs[centres - k])
        steepest = int(centres[np.argmin(slopes)])
    else:
        steepest = minimum
    # valley: the longest run over which the loss keeps falling, two thirds of the way in
    runs = np.ones(len(values), dtype=int)
    for i in range(1, len(values)):
        earlier = [runs[j] for j in range(i) if values[j] > values[i]]
        runs[i] = 1 + max(earlier, default=0)
    end = int(np.argmax(runs))
    start = max(end - runs[end] + 1, 0)
    valley = start + (end - start) * 2 // 3
    return {"steepest": float(lrs[steepest]), "valley": float(lrs[valley]),
            "minimum/10": float(lrs[minimum] / 10)}


def find_lr(learner, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
            beta: float = 0.98, diverge: float = 4.0, progress: bool = True) -> LRFinderResult:
    """Train ``learner``'s model for up to ``steps`` batches with the learning rate growing
    exponentially from ``start_lr`` to ``end_lr``; stop when the smoothed loss exceeds
    ``diverge`` times its minimum. The model's weights and buffers are restored after."""
    model = learner.model
    saved = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer(model, learner.optimizer_name, start_lr, learner.weight_decay)
    generator = torch.Generator(learner.device).manual_seed(learner.seed)
    ratio = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    lrs, losses = [], []
    average, best = 0.0, math.inf
    model.train()
    bar = tqdm(total=steps, desc="lr find", leave=False, disable=None if progress else True)
    try:
        for x, y in _endless(learner.train_loader):
            lr = start_lr * ratio ** len(lrs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = learner.pipeline.train_batch(x, y, generator)
            loss = learner.task.loss(model(x), y, weighted=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            average = beta * average + (1 - beta) * loss.item()
            smoothed = average / (1 - beta ** (len(lrs) + 1))
            lrs.append(lr)
            losses.append(smoothed)
            bar.update(1)
            best = min(best, smoothed)
            if not math.isfinite(smoothed) or smoothed > diverge * best or len(lrs) >= steps:
                break
    finally:
        bar.close()
        model.load_state_dict(saved)
    lrs, losses = _finite(lrs, losses)
    return LRFinderResult(lrs, losses, suggest(lrs, losses) if len(lrs) > 2 else {})


def _endless(loader):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _finite(lrs: list[float], losses: list[float]) -> tuple[list[float], list[float]]:
    keep = [i for i, value in enumerate(losses) if math.isfinite(value)]
    return [lrs[i] for i in keep], [losses[i] for i in keep]
