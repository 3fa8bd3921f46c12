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
