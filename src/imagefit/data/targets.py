"""A CSV's label columns read into targets, and the task they make when --task does not say:
one-hot or numbers (regression), delimited or space-separated tags (multi-label), or
classes; with the warnings for columns that look like another kind."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..config import SourceOptions
from ..errors import ImagefitError, ImagefitWarning
from ..tasks import KINDS, Task, task_class
from .table import check_float32

LABEL_DELIMITERS = (";", "|")
MANY_INTEGER_CLASSES = 50
MOSTLY_WHOLE = 0.05  # at most this share of decimals in a column of whole numbers is warned of


def line_name(row: int) -> str:
    return f"line {row + 2}"  # the header is line 1


def _number(cell: str) -> float:
    """A cell's number (NaN, inf included), or NaN when it is empty or not a number."""
    try:
        return float(cell)
    except ValueError:
        return float("nan")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _as_numbers(cells: pd.DataFrame, name: str) -> np.ndarray | None:
    """The cells as floats (empty cells NaN), or None when some non-empty cell is text or all
    are empty. A 'nan' or 'inf' among numbers is an error naming its line."""
    filled = (cells != "").to_numpy()
    if not filled.any() or not cells.map(_is_number).to_numpy()[filled].all():
        return None
    numbers = cells.map(_number).to_numpy(np.float64)
    bad = filled & ~np.isfinite(numbers)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise ImagefitError(
            f"{name} {line_name(row)}: '{cells.iat[row, col]}' in column '{cells.columns[col]}' is "
            "not a finite number; fix it or remove the row"
        )
    return numbers


def _class_sort_key(name: str) -> tuple:
    value = _number(name)
    return (0, value, name) if np.isfinite(value) else (1, 0.0, name)


def _first_empty(cells: pd.DataFrame, name: str, what: str) -> None:
    """An error naming the first empty cell, if there is one."""
    empty = (cells == "").to_numpy()
    if empty.any():
        row, col = (int(v[0]) for v in np.nonzero(empty))
        count = int(empty.sum())
        advice = (f"is empty ({count} such rows); fill them or remove the rows" if count > 1
                  else "is empty; fill it or remove the row")
        raise ImagefitError(f"{name} {line_name(row)}: {what} '{cells.columns[col]}' {advice}")


def read_targets(labels: pd.DataFrame, name: str, options: SourceOptions):
    """Infer (or apply the forced) task and encode the targets."""
    forced = task_class(options.task) if options.task in KINDS else None
    cells = labels.apply(lambda column: column.str.strip())
    numbers = _as_numbers(cells, name)
    known = numbers[~np.isnan(numbers)] if numbers is not None else np.empty(0)
    binary = numbers is not None and np.isin(known, (0.0, 1.0)).all()
    several = labels.shape[1] > 1

    inferred_values = forced is None and numbers is not None and not binary and (
        several or (known % 1 != 0).any())
    if (forced is not None and not forced.has_classes) or inferred_values:
        if forced is None and not several:
            _warn_if_mostly_whole(numbers[:, 0], cells, name)
        return _regression_targets(cells, name)
    if several:
        if not binary:
            raise ImagefitError(
                f"{name}: label columns {', '.join(labels.columns)} must be 0/1 (one-hot) or "
                "numbers (regression); pick one label column with --label-col"
            )
        _first_empty(cells, name, "one-hot column")
        names = list(labels.columns)
        counts = numbers.sum(axis=1)
        if (forced is not None and forced.multi_label) or (forced is None
                                                           and (counts != 1).any()):
            return Task("multilabel", names), numbers.astype(np.float32)
        if (counts != 1).any():
            row = int(np.flatnonzero(counts != 1)[0])
            raise ImagefitError(
                f"{name} {line_name(row)}: a single-label row needs exactly one 1 among "
                f"{', '.join(names)} (found {int(counts[row])}); fix it or use --task multilabel"
            )
        return Task("classification", names), numbers.argmax(axis=1).astype(np.int64)

    column = labels.columns[0]
    cells = cells[column]
    delim = options.label_delim
    if delim is None and not (forced is not None and forced.single_label):
        delim = next((d for d in LABEL_DELIMITERS if cells.str.contains(d, regex=False).any()),
                     None)
        if delim is None and _holds_tag_lists(cells):
            delim = " "
            warnings.warn(
                f"{name}: column '{column}' holds space-separated tags (e.g. "
                f"'{cells[cells.str.contains(' ')].iloc[0]}'), so it is read as multi-label; "
                "give --task classification to take each cell as one class",
                ImagefitWarning, stacklevel=3)
    if (forced is not None and forced.multi_label) or (forced is None and delim is not None):
        split_cells = [
            [part.strip() for part in cell.split(delim) if part.strip()] if delim else
            ([cell] if cell else [])
            for cell in cells
        ]
        names = sorted({n for row in split_cells for n in row}, key=_class_sort_key)
        index = {n: i for i, n in enumerate(names)}
        targets = np.zeros((len(cells), len(names)), dtype=np.float32)
        for row, parts in enumerate(split_cells):
            targets[row, [index[n] for n in parts]] = 1.0
        return Task("multilabel", names), targets
    _first_empty(cells.to_frame(), name, "the label in column")
    names = sorted(cells.unique(), key=_class_sort_key)
    if numbers is not None and len(names) > MANY_INTEGER_CLASSES:
        warnings.warn(
            f"{name}: the {len(names)} whole numbers in '{column}' are taken as classes; "
            "pass --task regression if they are quantities", ImagefitWarning, stacklevel=2
        )
    index = {n: i for i, n in enumerate(names)}
    return Task("classification", names), cells.map(index).to_numpy(np.int64)


def _holds_tag_lists(cells: pd.Series) -> bool:
    """Whether cells are lists of space-separated tags (Kaggle's Planet: 'clear primary
    water'): there are more distinct cells than distinct words, as combinations of a few
    tags are; class names with spaces each bring words of their own."""
    whole = {cell for cell in cells.unique() if cell}
    if not any(" " in cell for cell in whole):
        return False
    words = {word for cell in whole for word in cell.split()}
    return len(whole) > len(words)


def _warn_if_mostly_whole(values: np.ndarray, cells: pd.DataFrame, name: str) -> None:
    """Say so when a column of whole numbers becomes a regression target because of a few
    values with decimals: they may be typos in a column of classes."""
    filled = ~np.isnan(values)
    fractional = np.flatnonzero(filled & (np.mod(values, 1) != 0))
    if not len(fractional) or len(fractional) > MOSTLY_WHOLE * filled.sum():
        return
    row = int(fractional[0])
    more = f" and {len(fractional) - 1} more" if len(fractional) > 1 else ""
    warnings.warn(
        f"{name}: column '{cells.columns[0]}' holds whole numbers except "
        f"'{cells.iat[row, 0]}' ({line_name(row)}){more}, so it is read as a regression target; "
        "if its values are classes, fix those rows (or give --task classification)",
        ImagefitWarning, stacklevel=4)


def _regression_targets(cells: pd.DataFrame, name: str):
    _first_empty(cells, name, "regression target")
    numbers = cells.map(_number).to_numpy(np.float64)
    bad = ~np.isfinite(numbers)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise ImagefitError(
            f"{name} {line_name(row)}: regression target '{cells.columns[col]}' is "
            f"'{cells.iat[row, col]}', not a number; fix it or remove the row"
        )
    check_float32(numbers, lambda row, col: f"{name} {line_name(row)}: regression target "
                   f"'{cells.columns[col]}' is {cells.iat[row, col]}")
    return Task("regression", list(cells.columns)), numbers.astype(np.float32)
