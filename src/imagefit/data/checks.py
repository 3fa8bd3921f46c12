"""Checks that data can train, made before a run directory exists: a fit on data that cannot
teach anything (one class, a class with no training images, a constant target, no training
rows) is refused with one line naming what is wrong; copies of images across splits are a
warning and a note in metrics.json."""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..errors import ImagefitError, ImagefitWarning
from .cache import ImageCache
from .duplicates import find_duplicates
from .table import SPLITS, Table

SHOWN = 3  # names or files listed in one message


def check_has_training_rows(table: Table) -> None:
    """Refuse a source whose rows are all validation or test rows."""
    if table.has_split("train"):
        return
    counts = ", ".join(f"{int((table.split == s).sum())} {s}" for s in SPLITS
                       if table.has_split(s))
    raise ImagefitError(f"{table.description} has no training rows ({counts or 'no rows'}): "
                        "mark the rows to learn from as 'train' in its split column, or leave "
                        "the split column out")


def check_trainable(table: Table, cache: ImageCache, train_rows: np.ndarray) -> None:
    """Refuse training rows that cannot teach the task: no readable image, a single class,
    a class without training images, a multi-label set with no label, a constant target."""
    if len(train_rows) == 0:
        raise ImagefitError(_no_readable_training(table, cache))
    if table.task.single_label:
        _check_classes(table, cache, train_rows)
    elif table.task.multi_label:
        _check_labels(table, train_rows)
    else:
        _check_targets(table, train_rows)


def _no_readable_training(table: Table, cache: ImageCache) -> str:
    failed = [row for row in cache.failed if table.split[row] == "train"]
    if not failed:
        return f"{table.description} has no training images"
    first = failed[0]
    where = f"{table.paths[first]}: {cache.errors[first]}" if table.paths else cache.errors[first]
    return (f"none of the {len(failed)} training images of {table.description} can be read "
            f"(first: {where}): fix or replace the files")


def _check_classes(table: Table, cache: ImageCache, train_rows: np.ndarray) -> None:
    names = table.task.names
    counts = np.bincount(table.targets[train_rows], minlength=len(names))
    if len(names) < 2:
        raise ImagefitError(_single_class(table, names[0]))
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        first = int(missing[0])
        listed = ", ".join(repr(names[i]) for i in missing[:SHOWN])
        more = (f" ({len(missing)} such classes: {listed}"
                f"{' ...' if len(missing) > SHOWN else ''})") if len(missing) > 1 else ""
        raise ImagefitError(f"class '{names[first]}' has no training images "
                            f"({_why_absent(table, cache, first)}){more}: add readable training "
                            "images of it, or remove its rows (or folder)")


def _single_class(table: Table, name: str) -> str:
    message = (f"{table.description}: every training image has the label '{name}': a "
               "classifier needs at least two classes")
    if _is_number(name):
        return (message + f"; the label column holds the number {name} throughout, so there is "
                "nothing to learn: give targets that vary")
    return message + ": add images of another class"


def _why_absent(table: Table, cache: ImageCache, index: int) -> str:
    """Where a class's images are, when none of them trains."""
    of_class = table.targets == index
    training = of_class & (table.split == "train")
    if training.any():
        return f"its {int(training.sum())} training image(s) cannot be read, e.g. " \
            f"{table.paths[int(np.flatnonzero(training)[0])]}" if table.paths else \
            f"its {int(training.sum())} training image(s) cannot be read"
    elsewhere = [f"{int((of_class & (table.split == s)).sum())} in {s}" for s in SPLITS
                 if (of_class & (table.split == s)).any()]
    return "its images are " + " and ".join(elsewhere) + " only" if elsewhere \
        else "it has no images at all"


def _check_labels(table: Table, train_rows: np.ndarray) -> None:
    targets = np.asarray(table.targets[train_rows], dtype=np.float32)
    positives = targets.sum(axis=0)
    if not positives.any():
        raise ImagefitError(f"{table.description}: no training image has any label: a "
                            "multi-label model learns from the labels present; add them")
    never = [table.task.names[i] for i in np.flatnonzero(positives == 0)]
    if never:
        warnings.warn(f"label(s) {', '.join(repr(n) for n in never[:SHOWN])}"
                      f"{' ...' if len(never) > SHOWN else ''} are on no training image, so "
                      "the model cannot learn them: add training images with them, or drop "
                      "them", ImagefitWarning, stacklevel=3)


def _check_targets(table: Table, train_rows: np.ndarray) -> None:
    values = np.asarray(table.targets[train_rows], dtype=np.float64).reshape(
        len(train_rows), -1)
    for column, name in enumerate(table.task.names):
        if len(values) and np.ptp(values[:, column]) == 0:
            raise ImagefitError(f"regression target '{name}' is {values[0, column]:g} for every "
                                "training image: there is nothing to learn; give targets that "
                                "vary")


def leak_notes(table: Table, cache: ImageCache, rows: dict[str, np.ndarray]) -> dict:
    """Exact copies across splits (identical cached pixels), warned about and returned for
    metrics.json: a validation or test image that is a copy of a training image makes its
    figures optimistic; copies under different labels contradict each other."""
    split_of = np.full(len(table), -1, dtype=np.int8)
    for k, name in enumerate(SPLITS):
        split_of[rows[name]] = k
    found = find_duplicates(table, cache, split_of)
    leaks = {entry["splits"]: entry["leaked_images"] for entry in found["cross_split_duplicates"]
             if entry["leaked_images"]}
    notes: dict = {}
    if leaks:
        example = next(e for e in found["duplicate_examples"] if e["splits"] in leaks)
        pair = example["paths"][:2] or [f"row {r}" for r in example["rows"][:2]]
        shown = f"{pair[0]}, listed twice" if pair[0] == pair[1] else " = ".join(pair)
        counts = ", ".join(f"{n} {pair.split('-')[1]} image(s) copy {pair.split('-')[0]} ones"
                           for pair, n in leaks.items())
        warnings.warn(f"exact copies across splits: {counts} (e.g. {shown}): their figures are "
                      "optimistic; remove the copies or keep each in one split",
                      ImagefitWarning, stacklevel=3)
        notes["leaks"] = {"copies_across_splits": leaks,
                          "examples": [e for e in found["duplicate_examples"]
                                       if e["splits"] in leaks][:SHOWN]}
    if found["duplicate_label_conflicts"]:
        count = found["duplicate_label_conflicts"]
        warnings.warn(f"{count} group(s) of identical images carry different labels: the "
                      "labels contradict each other; fix them", ImagefitWarning, stacklevel=3)
        notes.setdefault("leaks", {})["label_conflicts"] = count
    return notes


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
