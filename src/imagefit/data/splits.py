"""Validation splits carved from the training rows: seeded, stratified where it can be."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import ImagefitError
from .table import Table


def assign_validation(table: Table, valid_pct: float, seed: int, stratify: bool = True) -> Table:
    """Mark ``valid_pct`` of the training rows 'valid', unless the source gave a validation
    split. Classification splits keep the class proportions when ``stratify`` is on."""
    if table.has_split("valid") or valid_pct == 0:
        return table
    train_rows = table.rows("train")
    n_valid = int(round(valid_pct * len(train_rows)))
    if n_valid == 0 or n_valid == len(train_rows):
        raise ImagefitError(
            f"--valid-pct {valid_pct} of {len(train_rows)} training images leaves "
            f"{'no validation' if n_valid == 0 else 'no training'} images: "
            "choose another fraction, or 0 for no validation"
        )
    labels = None
    if stratify and table.task.single_label:
        labels = table.targets[train_rows]
        counts = np.bincount(labels, minlength=table.task.n_out)
        single = [table.task.names[i] for i in np.flatnonzero(counts == 1)]
        if single:
            raise ImagefitError(
                f"class '{single[0]}' has a single training image ({len(single)} such classes)"
                ": a stratified validation split needs at least 2 per class; add images, "
                "or pass --no-stratify"
            )
        n_classes = int((counts > 0).sum())
        if n_valid < n_classes or len(train_rows) - n_valid < n_classes:
            labels = None  # too few images to give every class a place on both sides
    _, valid_rows = train_test_split(
        train_rows, test_size=n_valid, random_state=seed, stratify=labels
    )
    split = table.split.copy()
    split[valid_rows] = "valid"
    return replace(table, split=split)
