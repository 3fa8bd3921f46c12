"""Soft labels from out-of-fold predictions: each training row's target becomes
``alpha * given + (1 - alpha) * predicted``, where the prediction comes from the fold model
that never trained on the row (``imagefit cv`` writes them to oof.csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import ImagefitError
from ..tasks import Task
from .table import Table


def read_oof(source: str | Path) -> tuple[Path, pd.DataFrame]:
    path = Path(source)
    if path.is_dir():
        path = path / "oof.csv"
    if not path.is_file():
        raise ImagefitError(f"--soft-labels {source}: no oof.csv there; give a CV directory "
                            "written by imagefit cv, or its oof.csv")
    try:
        return path, pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise ImagefitError(f"--soft-labels {path}: cannot read it ({error})") from None


def soft_targets(source: str | Path, alpha: float, table: Table, task: Task,
                 train_rows: np.ndarray) -> torch.Tensor:
    """(N, C) float targets: the given labels, with the training rows softened towards
    their out-of-fold probabilities. Every training row must have one."""
    if not task.has_classes:
        raise ImagefitError("--soft-labels blends class probabilities: it needs "
                            "classification or multi-label data")
    path, frame = read_oof(source)
    columns = [f"prob_{name}" for name in task.names]
    missing = [c for c in ["row", *columns] if c not in frame.columns]
    if missing:
        raise ImagefitError(f"--soft-labels {path} has no column {missing[0]}: it was not "
                            f"written for these classes ({', '.join(task.names)})")
    rows = frame["row"].to_numpy(np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(table)):
        raise ImagefitError(f"--soft-labels {path} has row {rows.max()} but the data has "
                            f"{len(table)} rows: it was written for other data")
    if table.paths is not None and "path" in frame.columns:
        given = np.asarray(table.paths, dtype=object)[rows]
        differ = np.flatnonzero(frame["path"].to_numpy(dtype=object) != given)
        if len(differ):
            raise ImagefitError(f"--soft-labels {path}: row {rows[differ[0]]} is "
                                f"{frame['path'].iat[differ[0]]} there but {given[differ[0]]} "
                                "in the data: it was written for other data")
    probabilities = np.full((len(table), task.n_out), np.nan, dtype=np.float32)
    probabilities[rows] = frame[columns].to_numpy(np.float32)
    uncovered = train_rows[np.isnan(probabilities[train_rows, 0])]
    if len(uncovered):
        raise ImagefitError(f"--soft-labels {path} has no prediction for training row "
                            f"{uncovered[0]} ({len(uncovered)} rows): run imagefit cv on "
                            "the same data and --valid-pct")
    hard = torch.as_tensor(task.label_matrix(table.targets), dtype=torch.float32)
    soft = hard.clone()
    train = torch.as_tensor(train_rows)
    soft[train] = alpha * hard[train] + (1 - alpha) * torch.as_tensor(probabilities)[train]
    return soft
