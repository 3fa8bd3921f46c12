"""Schedules as pure functions of training progress in [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[float], float]


def cosine(start: float, end: float) -> Schedule:
    """Half a cosine from ``start`` (progress 0) to ``end`` (progress 1)."""
    return lambda p: end + (start - end) * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0))) / 2


def joined(first: Schedule, second: Schedule, split: float) -> Schedule:
    """``first`` over [0, split], then ``second`` over [split, 1], each seeing its own 0..1."""
    def schedule(p: float) -> float:
        if p < split:
            return first(p / split)
        return second((p - split) / (1 - split) if split < 1 else 1.0)
    return schedule


def one_cycle(lr_max: float, pct_start: float = 0.25, div: float = 25.0,
              div_final: float = 1e4) -> Schedule:
    """Learning rate: cosine warm-up from lr_max/div to lr_max over ``pct_start`` of training,
    then cosine annealing to lr_max/div_final."""
    return joined(cosine(lr_max / div, lr_max), cosine(lr_max, lr_max / div_final), pct_start)


def one_cycle_momentum(high: float = 0.95, low: float = 0.85,
                       pct_start: float = 0.25) -> Schedule:
    """Momentum (or Adam's beta1) moving against the learning rate: down while it warms up,
    back up while it anneals."""
    return joined(cosine(high, low), cosine(low, high), pct_start)


def constant(value: float) -> Schedule:
    return lambda p: value


def flat_cos(lr: float, pct_flat: float = 0.75, div_final: float = 1e5) -> Schedule:
    """Flat at ``lr`` for ``pct_flat`` of training, then cosine annealing (fastai's
    fit_flat_cos, made for Ranger)."""
    return joined(constant(lr), cosine(lr, lr / div_final), pct_flat)


def warmup_cosine(lr: float, pct_warmup: float = 0.05, div_final: float = 1e4) -> Schedule:
    """Linear warm-up from 0 to ``lr``, then cosine annealing."""
    return joined(lambda p: lr * p, cosine(lr, lr / div_final), pct_warmup)


def step_decay(lr: float, milestones: tuple[float, ...] = (0.5, 0.75),
               gamma: float = 0.1) -> Schedule:
    """``lr`` multiplied by ``gamma`` at each milestone (fractions of training)."""
    return lambda p: lr * gamma ** sum(p >= m for m in milestones)


def sgdr_cycle_ends(n_cycles: int, cycle_len: int = 1, cycle_mult: int = 1) -> list[int]:
    """Epochs at which SGDR's cycles end: 3 cycles of 1 epoch with cycle_mult 2 end at
    epochs 1, 3 and 7 (and restart after the first two)."""
    ends, total = [], 0
    for cycle in range(n_cycles):
        total += cycle_len * cycle_mult**cycle
        ends.append(total)
    return ends


def sgdr(lr: float, n_cycles: int, cycle_len: int = 1, cycle_mult: int = 1,
         div_final: float = 1e3) -> Schedule:
    """Cosine annealing with warm restarts: each cycle anneals from ``lr`` to lr/div_final;
    cycle k lasts cycle_len * cycle_mult**k epochs."""
    ends = sgdr_cycle_ends(n_cycles, cycle_len, cycle_mult)
    bounds = [0.0] + [end / ends[-1] for end in ends]
    anneal = cosine(lr, lr / div_final)

    def schedule(p: float) -> float:
        for start, end in zip(bounds[:-1], bounds[1:]):
            if p < end:
                return anneal((p - start) / (end - start))
        return anneal(1.0)
    return schedule
