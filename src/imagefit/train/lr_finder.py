"""The LR finder: an exponential sweep of the learning rate over a few hundred steps, the
smoothed loss it gives, and suggestions read from the curve. The model is restored after."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .optim import make_optimizer


@dataclass
class LRFinderResult:
    """Learning rates tried, their smoothed losses, and the suggested rates by rule:
    'steepest' (fastest fall of the loss), 'valley' (inside the longest fall) and
    'minimum/10' (a tenth of the rate at the lowest loss). ``flat``: the loss did not fall
    during the sweep (a task slow to show progress, such as many regressions), so the valley
    is taken a decade below the rate where the loss starts to rise."""

    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float] = field(default_factory=dict)
    flat: bool = False


# A sweep whose smoothed loss never falls this share below its usual level is flat (the
# smoothed loss of a regression on standardized targets wanders by about 5-10% with batches
# of 32); its edge is where the loss rises this much above that level for good.
FLAT_FALL = 0.15
RISE = 0.10


def _level(values: np.ndarray) -> tuple[int, float]:
    """Points to leave out at the start (estimates from few batches) and the loss's usual
    level: the median over the first half of the sweep after them."""
    skip = max(1, len(values) // 20)
    return skip, float(np.median(values[skip:max(skip + 3, len(values) // 2)]))


def is_flat(losses: list[float]) -> bool:
    """Whether the smoothed loss never fell meaningfully below its usual level."""
    values = np.asarray(losses)
    skip, level = _level(values)
    return bool(values[skip:].min() > level * (1 - FLAT_FALL))


def edge(lrs: list[float], losses: list[float]) -> float:
    """The rate from which on the loss stays above its usual level by ``RISE`` (the last rate
    tried when it never does)."""
    values = np.asarray(losses)
    skip, level = _level(values)
    below = np.flatnonzero(values[skip:] <= level * (1 + RISE))
    last = skip + int(below[-1]) + 1 if len(below) else skip
    return float(lrs[min(last, len(lrs) - 1)])


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Read the suggestions off a smoothed loss curve; on a flat curve the valley is a tenth
    of the edge where the loss starts to rise (the longest fall there would be noise)."""
    log_lrs = np.log10(lrs)
    values = np.asarray(losses)
    skip = max(1, len(values) // 20)
    minimum = skip + int(np.argmin(values[skip:]))
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
    valley = float(lrs[start + (end - start) * 2 // 3])
    if is_flat(losses):
        valley = edge(lrs, losses) / 10
    return {"steepest": float(lrs[steepest]), "valley": valley,
            "minimum/10": float(lrs[minimum] / 10)}


# Within ``seconds``: the steps timed before the sweep is spread over what fits, and the
# fewest it is ever spread over (about four steps a decade of the default range).
TIMED_STEPS = 3
MIN_TIMED_SWEEP = 32


def find_lr(learner, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
            beta: float = 0.98, diverge: float = 4.0, progress: bool = True,
            seconds: float | None = None) -> LRFinderResult:
    """Train ``learner``'s model for up to ``steps`` optimizer steps with the learning rate
    growing exponentially from ``start_lr`` to ``end_lr``; stop when the smoothed loss exceeds
    ``diverge`` times its minimum or is not finite. The model's weights, buffers and
    gradients and the random state are restored after.

    ``seconds`` (a --budget fit's share for the sweep): the first ``TIMED_STEPS`` steps are
    timed and the rest of the range is spread over the steps that fit in it (never fewer
    than ``MIN_TIMED_SWEEP`` in all, nor more than ``steps``), so the sweep still reaches
    ``end_lr``, more coarsely, its loss smoothed over the same share of the sweep (``beta``
    is for ``steps``).

    Each step is computed as the fit's (``Learner.sweep_gradients``, ``step_optimizer``), so
    the rate found is for the fit's arithmetic: its precision (bf16 or fp16 autocast; a bf16
    fault on a CPU is computed again in fp32 as in training, while a loss that fp32 cannot
    compute either ends the sweep as a divergence), memory format (channels_last), compiled
    model (``--compile``), gradient clipping and ``accumulate`` (one rate per optimizer step
    over that many batches, as the fit steps). Not the fit's: its schedule, layer groups'
    rates, callbacks and EMA."""
    model = learner.model
    saved = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer(model, learner.optimizer_name, start_lr, learner.weight_decay)
    generator = torch.Generator(learner.device).manual_seed(learner.seed)
    ratio = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    lrs, losses, raw = [], [], []
    average, best = 0.0, math.inf
    model.train()
    model.zero_grad(set_to_none=True)
    batches = _endless(learner.train_loader)
    bar = tqdm(total=steps, desc="lr find", leave=False, disable=None if progress else True)
    lr, started = start_lr / ratio, time.perf_counter()
    try:
        while True:
            if seconds is not None and len(lrs) == TIMED_STEPS:
                step_seconds = (time.perf_counter() - started) / TIMED_STEPS
                fit = int(seconds / max(step_seconds, 1e-9))
                planned, steps = steps, min(steps, max(MIN_TIMED_SWEEP, fit))
                ratio = (end_lr / lr) ** (1 / max(steps - len(lrs), 1))
                # the loss smoothed over the same share of a shorter sweep
                beta = 1 - (1 - beta) * planned / steps
                average = 0.0
                for n, value in enumerate(raw):
                    average = beta * average + (1 - beta) * value
                    losses[n] = average / (1 - beta ** (n + 1))
                best = min(losses)
                bar.total = steps
                bar.refresh()
            lr *= ratio
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = sum(float(learner.sweep_gradients(*next(batches), generator))
                       for _ in range(learner.accumulate)) / learner.accumulate
            learner.step_optimizer(optimizer)
            raw.append(loss)
            average = beta * average + (1 - beta) * loss
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
        model.zero_grad(set_to_none=True)  # the sweep's last gradients would join step one
    lrs, losses = _finite(lrs, losses)
    if len(lrs) <= 2:
        return LRFinderResult(lrs, losses)
    return LRFinderResult(lrs, losses, suggest(lrs, losses), flat=is_flat(losses))


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
