"""Class imbalance: resampled training rows, loss weights and a per-epoch weighted draw.

Everything here sees training rows only; validation rows keep the data's own proportions so
that their metrics stay honest.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import ImagefitError
from ..tasks import Task


def _require_classes(task: Task, what: str) -> None:
    if not task.has_classes:
        raise ImagefitError(
            f"{what} needs classes, and {task.kind} targets have none: remove the option"
        )


def _repeat_to(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` rows from ``rows``: every row ``count // len(rows)`` times, and a random
    ``count % len(rows)`` of them once more."""
    whole, part = divmod(count, len(rows))
    return np.concatenate([np.tile(rows, whole), rng.choice(rows, part, replace=False)])


def resample_rows(
    train_rows: np.ndarray,
    targets: np.ndarray,
    task: Task,
    *,
    oversample: dict[str, float] | None = None,
    balance: Literal["over", "under"] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Training row indices, sorted, with repeats, for one of two kinds of resampling.

    ``targets`` is the whole table's targets, indexed by ``train_rows``. ``oversample`` maps a
    class (or label) name to a factor: 3 repeats each of its rows three times, 2.5 twice and a
    seeded random half of them a third time, 0.5 keeps a random half. A multi-label row takes
    the largest factor among its labels. ``balance='over'`` repeats every class up to the
    largest one, ``'under'`` cuts every class down to the smallest (single-label only).
    """
    train_rows = np.asarray(train_rows, dtype=np.int64)
    if not oversample and balance is None:
        return train_rows
    _require_classes(task, "--oversample" if oversample else "--balance")
    if oversample and balance:
        raise ImagefitError("--oversample and --balance both resample: give one of them")
    if balance not in (None, "over", "under"):
        raise ImagefitError(f"--balance {balance} is unknown: choose over or under")
    if len(train_rows) == 0:
        return train_rows
    rng = np.random.default_rng(seed)

    names = task.names
    if oversample:
        index = {name: i for i, name in enumerate(names)}
        unknown = [name for name in oversample if name not in index]
        if unknown:
            raise ImagefitError(
                f"--oversample class '{unknown[0]}' is not a class of the data: choose from "
                f"{', '.join(names)}"
            )
        bad = {name: f for name, f in oversample.items() if not f > 0}
        if bad:
            name, factor = next(iter(bad.items()))
            raise ImagefitError(
                f"--oversample {name}={factor}: the factor must be above 0 (3 triples a class)"
            )
        factors = np.ones(len(names))
        for name, factor in oversample.items():
            factors[index[name]] = factor
        labels = task.label_matrix(targets[train_rows])
        row_factor = np.where(labels, factors, 0.0).max(axis=1, initial=0.0)
        row_factor[~labels.any(axis=1)] = 1.0
        parts = [
            _repeat_to(train_rows[row_factor == factor],
                       int(round(factor * (row_factor == factor).sum())), rng)
            for factor in np.unique(row_factor)
        ]
        return np.sort(np.concatenate(parts))

    if not task.single_label:
        raise ImagefitError(
            "--balance needs single-label classes, and multi-label rows carry several: "
            "use --oversample LABEL=FACTOR or class weights instead"
        )
    labels = targets[train_rows]
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    target = counts[present].max() if balance == "over" else counts[present].min()
    parts = [_repeat_to(train_rows[labels == c], int(target), rng) for c in present]
    return np.sort(np.concatenate(parts))


def class_weights(targets: np.ndarray, task: Task) -> torch.Tensor:
    """Loss weights from the training targets.

    Classification: one weight per class, inversely proportional to its frequency and with
    mean 1 over the classes present (absent classes weigh 0: no row carries them).
    Multi-label: a ``pos_weight`` per label, negatives / positives (1 when a label is always
    or never present), for ``BCEWithLogitsLoss``.
    """
    _require_classes(task, "class weights")
    counts = task.label_matrix(targets).sum(axis=0).astype(np.float64)
    if task.multi_label:
        negatives = len(targets) - counts
        usable = (counts > 0) & (negatives > 0)
        weights = np.where(usable, negatives / np.maximum(counts, 1), 1.0)
        return torch.tensor(weights, dtype=torch.float32)
    inverse = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    weights = inverse / inverse[counts > 0].mean()
    return torch.tensor(weights, dtype=torch.float32)


def _row_weights(targets: np.ndarray, task: Task) -> np.ndarray:
    """Each row's draw weight: 1 / its class's count, so every class totals the same weight.
    A multi-label row counts as its rarest label; rows with no label form a class of their
    own."""
    present = task.label_matrix(targets)
    counts = present.sum(axis=0)
    inverse = np.where(present, 1.0 / np.maximum(counts, 1), 0.0).max(axis=1, initial=0.0)
    unlabelled = ~present.any(axis=1)
    inverse[unlabelled] = 1.0 / max(int(unlabelled.sum()), 1)
    return inverse


def weighted_sampler_rows(
    train_rows: np.ndarray,
    targets: np.ndarray,
    task: Task,
    *,
    n: int | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> np.ndarray:
    """One epoch of ``n`` training rows (default: as many as there are), drawn with
    replacement so that every class is drawn about equally often; the same ``seed`` and
    ``epoch`` give the same rows. ``targets`` is the whole table's, indexed by ``train_rows``.
    """
    _require_classes(task, "--weighted-sampler")
    train_rows = np.asarray(train_rows, dtype=np.int64)
    weights = torch.as_tensor(_row_weights(targets[train_rows], task), dtype=torch.float64)
    state = np.random.SeedSequence([seed, epoch]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    draws = torch.multinomial(weights, n or len(train_rows), replacement=True,
                              generator=generator)
    return train_rows[draws.numpy()]
