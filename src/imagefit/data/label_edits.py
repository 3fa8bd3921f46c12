"""A fit acting on a list of label issues (``imagefit label-issues``'s CSV): ``--drop-rows``
leaves the listed training images out, ``--relabel`` gives them the suggested label. Only
training rows change: a listed validation or test row is counted and left as it is, so the
figures stay comparable with a fit on the data as given."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ImagefitError
from .table import Table

DROPPED = "dropped"  # the split of a row left out: in no split, read by no loader


def read_issues(path: str | Path, top: int | None, min_score: float | None,
                option: str) -> pd.DataFrame:
    """The issues CSV's rows to act on: the ``top`` ranked first, or those scoring at
    least ``min_score``."""
    path = Path(path)
    if not path.is_file():
        raise ImagefitError(f"option {option}: {path} not found: give the CSV written by "
                            "imagefit label-issues")
    try:
        frame = pd.read_csv(path, dtype={"path": str, "given": str, "suggested": str},
                            keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        raise ImagefitError(f"option {option}: {path} is not a readable CSV file: give the "
                            "CSV written by imagefit label-issues") from None
    need = {"row", "path", "suggested", "score", "rank"}
    if not need <= set(frame.columns):
        missing = sorted(need - set(frame.columns))
        raise ImagefitError(f"option {option}: {path} has no column {missing[0]}: give the "
                            "CSV written by imagefit label-issues")
    for column, whole in (("row", True), ("rank", False), ("score", False)):
        frame[column] = _numbers(frame[column], whole, path, option)
    frame = frame.sort_values("rank", kind="stable")
    if min_score is not None:
        frame = frame[frame["score"] >= min_score]
    if top is not None:
        frame = frame.head(top)
    return frame


def _numbers(cells: pd.Series, whole: bool, path: Path, option: str) -> pd.Series:
    """A column of the issues CSV as numbers (whole ones for ``row``), or one error naming
    the first cell that is not one."""
    values = pd.to_numeric(cells, errors="coerce")
    bad = values.isna()
    if whole:
        bad |= ~np.isfinite(values) | (values.round() != values)
    if bad.any():
        line = int(np.flatnonzero(bad.to_numpy())[0])
        raise ImagefitError(f"option {option}: {path} line {line + 2}: {cells.name} "
                            f"'{cells.iloc[line]}' is not a {'whole ' if whole else ''}number: "
                            "give the CSV written by imagefit label-issues")
    return values.astype(np.int64) if whole else values


def match_rows(table: Table, frame: pd.DataFrame, path: str | Path, option: str) -> np.ndarray:
    """The table rows the issues name: by file path when the data has paths, else by row
    number (built-in and in-memory data)."""
    if table.paths is not None:
        where = {p: i for i, p in enumerate(table.paths)}
        unknown = [p for p in frame["path"] if p not in where]
        if unknown:
            raise ImagefitError(f"option {option}: {path} names {len(unknown)} file(s) that "
                                f"are not in the data, e.g. {unknown[0]}: give the issues of "
                                "a CV on this data")
        return np.array([where[p] for p in frame["path"]], dtype=np.int64)
    rows = frame["row"].to_numpy(dtype=np.int64)
    bad = rows[(rows < 0) | (rows >= len(table))]
    if len(bad):
        raise ImagefitError(f"option {option}: {path} names row {int(bad[0])}, but the data "
                            f"has {len(table)} rows: give the issues of a CV on this data")
    return rows


def apply_label_edits(table: Table, drop_rows: str | None, relabel: str | None,
                      top: int | None, min_score: float | None) -> tuple[Table, dict]:
    """The table with the listed training rows dropped (their split becomes 'dropped') or
    relabelled with the suggested label, and what was done, for metrics.json."""
    if not drop_rows and not relabel:
        return table, {}
    option, path = ("--drop-rows", drop_rows) if drop_rows else ("--relabel", relabel)
    frame = read_issues(path, top, min_score, option)
    rows = match_rows(table, frame, path, option)
    training = table.split[rows] == "train"
    chosen = rows[training]
    record = {"file": str(path), "action": "drop" if drop_rows else "relabel",
              "listed": int(len(frame)), "not_training": int((~training).sum())}
    if drop_rows:
        split = table.split.copy()
        split[chosen] = DROPPED
        record["dropped"] = int(len(chosen))
        return replace(table, split=split), record
    targets = table.targets.copy()
    names = {name: i for i, name in enumerate(table.task.names)}
    suggested = frame["suggested"].to_numpy()[training]
    for row, label in zip(chosen.tolist(), suggested):
        if table.task.single_label:
            if label not in names:
                raise ImagefitError(f"option --relabel: {path} suggests '{label}', which is "
                                    "not a class of the data: give the issues of a CV on "
                                    "this data")
            targets[row] = names[label]
        elif table.task.multi_label:
            parts = [n for n in str(label).split(";") if n]
            unknown = [n for n in parts if n not in names]
            if unknown:
                raise ImagefitError(f"option --relabel: {path} suggests '{unknown[0]}', which "
                                    "is not a label of the data")
            targets[row] = 0
            targets[row, [names[n] for n in parts]] = 1
        else:
            raise ImagefitError("option --relabel: relabelling is for classification data")
    changed = int(sum(not np.array_equal(table.targets[r], targets[r]) for r in chosen))
    record.update(relabelled=changed, unchanged=int(len(chosen)) - changed)
    return replace(table, targets=targets), record
