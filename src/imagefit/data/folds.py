"""Cross-validation folds over the labelled rows: seeded, stratified or grouped, and saved to
a CSV file so that another run can reuse exactly the same folds.

Folds are drawn over every row that is not 'test': a validation split that the source gave
joins the pool, because in cross-validation each fold takes the validation role in turn.
Test rows get fold -1 and are never trained or validated on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

from ..errors import ImagefitError
from .sources import read_frame, require_column
from .table import Table

FOLD_METHODS = ("auto", "kfold", "stratified", "multilabel", "group")
NOT_IN_FOLDS = -1
MAX_REGRESSION_BINS = 10


def assign_folds(
    table: Table,
    k: int,
    *,
    seed: int = 0,
    method: str = "auto",
    groups: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """The fold (0..k-1) of every row of ``table``, -1 for test rows.

    ``method``: 'kfold' shuffles; 'stratified' keeps class proportions (classification),
    label frequencies (multilabel, iterative stratification) or the spread of the first target
    (regression, by quantile bins); 'multilabel' is iterative stratification by name; 'group'
    keeps each value of ``groups`` (one per table row) inside one fold, stratified by class for
    classification. 'auto' is 'group' when ``groups`` is given, else 'stratified'.
    """
    if method not in FOLD_METHODS:
        raise ImagefitError(
            f"--fold-method {method} is unknown: choose one of {', '.join(FOLD_METHODS)}"
        )
    if k < 2:
        raise ImagefitError(f"--folds {k} is too few: cross-validation needs at least 2 folds")
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != len(table):
            raise ImagefitError(
                f"{len(groups)} group values for {len(table)} images: give one group per image"
            )
    if method == "auto":
        method = "group" if groups is not None else "stratified"
    if method == "group" and groups is None:
        raise ImagefitError(
            "--fold-method group needs groups: name the group column with --group-col"
        )
    if method == "multilabel" and not table.task.multi_label:
        raise ImagefitError(
            f"--fold-method multilabel needs multi-label targets, not {table.task.kind}: "
            "use --fold-method stratified"
        )

    pool = np.flatnonzero(table.split != "test")
    if k > len(pool):
        raise ImagefitError(
            f"--folds {k} is more than the {len(pool)} labelled images: choose fewer folds"
        )
    targets = table.targets[pool]
    seeded = {"n_splits": k, "shuffle": True, "random_state": seed}
    if method == "group":
        pool_folds = _group_folds(targets, groups[pool], table, k, seed)
    else:
        if method == "kfold":
            splitter, labels = KFold(**seeded), None
        elif table.task.multi_label:
            splitter, labels = MultilabelStratifiedKFold(**seeded), targets
        elif table.task.single_label:
            _check_class_counts(targets, table.task.names, k)
            splitter, labels = StratifiedKFold(**seeded), targets
        else:
            splitter, labels = StratifiedKFold(**seeded), _quantile_bins(targets[:, 0], k)
        pool_folds = _folds_from_splits(splitter.split(np.zeros(len(pool)), labels), len(pool))

    folds = np.full(len(table), NOT_IN_FOLDS, dtype=np.int64)
    folds[pool] = pool_folds
    return folds


def _folds_from_splits(splits, n: int) -> np.ndarray:
    folds = np.empty(n, dtype=np.int64)
    for fold, (_, held_out) in enumerate(splits):
        folds[held_out] = fold
    return folds


def _check_class_counts(labels: np.ndarray, names: list[str], k: int) -> None:
    counts = np.bincount(labels, minlength=len(names))
    present = np.flatnonzero(counts)
    smallest = present[np.argmin(counts[present])]
    if counts[smallest] < k:
        raise ImagefitError(
            f"--folds {k} is more than the {counts[smallest]} images of class "
            f"'{names[smallest]}': stratified folds need each class in every fold; choose "
            f"at most {counts[smallest]} folds, add images, or use --fold-method kfold"
        )


def _quantile_bins(values: np.ndarray, k: int) -> np.ndarray:
    """Equal-count bins of ``values`` by rank, each holding at least ``k`` rows."""
    n_bins = max(1, min(MAX_REGRESSION_BINS, len(values) // k))
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return ranks * n_bins // len(values)


def _group_folds(targets: np.ndarray, groups: np.ndarray, table: Table, k: int,
                 seed: int) -> np.ndarray:
    unique, group_of_row, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if k > len(unique):
        raise ImagefitError(
            f"--folds {k} is more than the {len(unique)} groups: each fold needs a group of "
            "its own; choose at most that many folds"
        )
    if table.task.single_label and np.bincount(targets).max() >= k:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            splits = list(splitter.split(np.zeros(len(targets)), targets, groups))
        return _folds_from_splits(splits, len(targets))
    # Largest groups first, each to the fold holding fewest rows; a seeded shuffle breaks ties.
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group = np.empty(len(unique), dtype=np.int64)
    rows_per_fold = np.zeros(k, dtype=np.int64)
    for group in order:
        fold = int(np.argmin(rows_per_fold))
        fold_of_group[group] = fold
        rows_per_fold[fold] += sizes[group]
    return fold_of_group[group_of_row]


def read_groups(csv_path: str | Path, column: str, table: Table) -> np.ndarray:
    """The ``column`` of the CSV file that ``table`` was read from, one value per row."""
    csv_path = Path(csv_path)
    frame = read_frame(csv_path)
    require_column(frame, column, "--group-col", csv_path.name)
    if len(frame) != len(table):
        raise ImagefitError(
            f"{csv_path.name} has {len(frame)} rows but the data has {len(table)}: "
            "--group-col needs the CSV file the data was read from"
        )
    values = frame[column].str.strip()
    empty = np.flatnonzero((values == "").to_numpy())
    if len(empty):
        raise ImagefitError(
            f"{csv_path.name} line {empty[0] + 2}: group column '{column}' is empty; "
            "fill it or remove the row"
        )
    return values.to_numpy(dtype=object)


def split_for_fold(table: Table, folds: np.ndarray, fold: int) -> Table:
    """The table with ``fold`` as its validation split and the other folds as training."""
    split = table.split.copy()
    in_folds = folds != NOT_IN_FOLDS
    split[in_folds] = "train"
    split[folds == fold] = "valid"
    return replace(table, split=split)


def save_folds(path: str | Path, folds: np.ndarray, paths: Sequence[str] | None = None) -> Path:
    """Write the folds as a CSV file (row, path when known, fold) for ``--folds-file``."""
    path = Path(path)
    columns = {"row": np.arange(len(folds))}
    if paths is not None:
        columns["path"] = list(paths)
    columns["fold"] = np.asarray(folds, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


def load_folds(path: str | Path, table: Table) -> np.ndarray:
    """Folds saved by ``save_folds``, checked to describe the rows of ``table``."""
    path = Path(path)
    if not path.is_file():
        raise ImagefitError(f"--folds-file {path} not found: give a file written by a fold run")
    frame = read_frame(path)
    name = path.name
    for column in ("row", "fold"):
        require_column(frame, column, "--folds-file", name)

    def mismatch(reason: str) -> ImagefitError:
        return ImagefitError(
            f"--folds-file {name} does not match the data: {reason}; "
            "draw new folds for this data"
        )

    if len(frame) != len(table):
        raise mismatch(f"it has {len(frame)} rows, the data {len(table)}")
    try:
        rows = frame["row"].astype(np.int64).to_numpy()
        folds = frame["fold"].astype(np.int64).to_numpy()
    except ValueError:
        raise ImagefitError(
            f"--folds-file {name}: columns 'row' and 'fold' must hold whole numbers"
        ) from None
    if not np.array_equal(rows, np.arange(len(table))):
        raise mismatch("its rows are not numbered 0, 1, 2, ... in order")
    if "path" in frame.columns and table.paths is not None:
        differ = np.flatnonzero(frame["path"].to_numpy() != np.asarray(table.paths, dtype=object))
        if len(differ):
            raise mismatch(
                f"row {differ[0]} is {frame['path'].iat[differ[0]]}, the data has "
                f"{table.paths[differ[0]]} ({len(differ)} rows differ)"
            )
    is_test = table.split == "test"
    wrong = np.flatnonzero(is_test != (folds == NOT_IN_FOLDS))
    if len(wrong):
        raise mismatch(
            f"row {wrong[0]} has fold {folds[wrong[0]]} but is "
            f"{'a test row' if is_test[wrong[0]] else 'a labelled row'}"
        )
    k = int(folds.max()) + 1
    held = np.unique(folds[folds != NOT_IN_FOLDS])
    if folds.min() < NOT_IN_FOLDS or k < 2 or len(held) != k:
        raise ImagefitError(
            f"--folds-file {name}: folds must be numbered 0 to k-1 (k >= 2), each used, "
            "and -1 for test rows"
        )
    return folds
