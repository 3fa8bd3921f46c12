"""Readers that turn a folder, a CSV file or arrays into a ``Table`` of items and targets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import SourceOptions, refuse_unused
from ..errors import ImagefitError, ImagefitWarning
from ..tasks import Task
from .builtin import read_builtin
from .inputs import TextInput, table_input
from .table import SPLIT_ALIASES, Table
from .targets import line_name, read_targets
from .text import check_texts, looks_like_text

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".jfif"}
VALID_FOLDER_NAMES = ("valid", "val", "validation")


def read_source(spec: str | Path, options: SourceOptions | None = None) -> Table:
    """A table from ``builtin:NAME``, a folder of class folders or a CSV file; options that
    this data cannot use (a CSV column named for a folder, a text setting for images) are
    refused."""
    options = options or SourceOptions()
    text = str(spec)
    if text.startswith("builtin:"):
        refuse_unused(options, CSV_OPTIONS, f"{text} is a built-in dataset, not a CSV file")
        table = _force_task(read_builtin(text.removeprefix("builtin:")), options.task, text)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            refuse_unused(options, CSV_OPTIONS, f"{text} is a folder, not a CSV file")
            table = _force_task(read_folder(path), options.task, text)
        elif path.is_file():
            table = read_csv(path, options)
        else:
            raise ImagefitError(
                f"data {text} not found: give a folder of class folders, a CSV file, "
                "or builtin:digits / builtin:fashion-mnist"
            )
    if table_input(table).reads_images:
        refuse_unused(options, TEXT_OPTIONS, f"{text} holds images, not texts")
    return table


# Options only a CSV file uses, and options only texts use (``--task text``).
CSV_OPTIONS = ("path_col", "label_col", "text_col", "label_delim", "folder", "suffix",
               "split_col")
TEXT_OPTIONS = ("text_col", "text_length", "text_percentile", "keep_case")


def _force_task(table: Table, task: str | None, spec: str) -> Table:
    text = TextInput.name
    if task is None or task == table.task.kind or (task == text and not
                                                   table_input(table).reads_images):
        return table
    if task == text:
        raise ImagefitError(f"--task text reads texts from a CSV file, and {spec} holds "
                            "images: give a CSV with a column of texts and one of labels")
    raise ImagefitError(
        f"--task {task} does not fit {spec}: its labels are single class names; "
        "for multi-label or regression targets use a CSV file"
    )


# -- folders ------------------------------------------------------------------------------


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(folder: Path) -> dict[str, list[str]]:
    """Class name -> sorted file paths, for a folder holding one subfolder per class."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p)):
        files = sorted(
            str(f) for f in sub.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(sub).parts)
        )
        if not files:
            raise ImagefitError(
                f"class folder {sub} holds no images: add images or remove the folder"
            )
        classes[sub.name] = files
    return classes


def read_folder(root: Path) -> Table:
    """ImageNet-style folders: ``root/<class>/*`` or ``root/{train,valid,test}/<class>/*``."""
    parts = {"train": root / "train"}
    parts["valid"] = next((root / n for n in VALID_FOLDER_NAMES if (root / n).is_dir()), None)
    parts["test"] = root / "test"
    if not parts["train"].is_dir():
        parts = {"train": root}
    else:
        split_names = {"train", "test", *VALID_FOLDER_NAMES}
        others = sorted(p.name for p in root.iterdir()
                        if p.is_dir() and _visible(p) and p.name not in split_names)
        if others:
            raise ImagefitError(
                f"folder {root} holds train/ and also other folders ({', '.join(others[:3])}"
                f"{' ...' if len(others) > 3 else ''}), which would be ignored: move class "
                "folders into train/ (or valid/, test/), or remove train/")

    per_split: dict[str, dict[str, list[str]]] = {}
    for split, folder in parts.items():
        if folder is None or not folder.is_dir():
            continue
        classes = _class_folders(folder)
        if not classes:
            if split == "train":
                has_files = any(f.is_file() and _visible(f) for f in folder.iterdir())
                hint = " but no class folders" if has_files else ""
                raise ImagefitError(
                    f"folder {folder} holds images{hint}: put each class's images in a "
                    "subfolder named after the class, or describe them in a CSV file"
                    if has_files else
                    f"folder {folder} is empty: put each class's images in a subfolder "
                    "named after the class"
                )
            warnings.warn(
                f"{folder} has no class folders, so it is not used for evaluation "
                "(predict its images with `imagefit predict`)", ImagefitWarning, stacklevel=2
            )
            continue
        per_split[split] = classes

    names = sorted(per_split["train"])
    for split, classes in per_split.items():
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise ImagefitError(
                f"{parts[split]} has classes that train/ lacks ({', '.join(unknown[:5])}): "
                "give every class training images"
            )
    index = {name: i for i, name in enumerate(names)}
    paths, targets, split_of = [], [], []
    for split, classes in per_split.items():
        for name, files in classes.items():
            paths += files
            targets += [index[name]] * len(files)
            split_of += [split] * len(files)
    return Table(
        task=Task("classification", names),
        targets=np.asarray(targets, dtype=np.int64),
        split=np.asarray(split_of, dtype=object),
        paths=paths,
        description=str(root),
    )


# -- CSV files ----------------------------------------------------------------------------


def read_csv(path: Path, options: SourceOptions) -> Table:
    """A CSV of image paths and labels: one label column, one-hot columns, delimited labels
    or numeric targets; the task is inferred unless ``options.task`` is given."""
    name = path.name
    frame = read_frame(path)
    columns = list(frame.columns)

    def require(column: str, option: str) -> str:
        return require_column(frame, column, option, name)

    if options.text_col:
        path_col = require(options.text_col, "--text-col")
    else:
        path_col = require(options.path_col, "--path-col") if options.path_col else columns[0]
    text = options.task == TextInput.name or options.text_col is not None or _names_no_files(
        frame[path_col], path, options, name)
    split_col = require(options.split_col, "--split-col") if options.split_col else (
        "split" if "split" in columns and path_col != "split" else None
    )
    if options.label_col:
        label_cols = [require(c, "--label-col") for c in options.label_col]
    else:
        label_cols = [c for c in columns if c not in (path_col, split_col)]
    if not label_cols:
        raise ImagefitError(
            f"{name} has no label column besides the paths in '{path_col}': add one"
        )

    if text:
        texts = check_texts(frame[path_col], name, path_col)
        task, targets = read_targets(frame[label_cols], name,
                                      options.model_copy(update={"task": None}))
        return Table(task=task, targets=targets, split=_read_split(frame, split_col, name),
                     texts=texts, description=str(path))
    task, targets = read_targets(frame[label_cols], name, options)
    split = _read_split(frame, split_col, name)
    paths = _resolve_paths(frame[path_col].str.strip().tolist(), path, options)
    _check_repeated_files(paths, task, targets, name)
    return Table(
        task=task,
        targets=targets,
        split=split,
        paths=paths,
        description=str(path),
    )


def _names_no_files(cells: pd.Series, csv_path: Path, options: SourceOptions,
                    name: str) -> bool:
    """Whether a CSV's first column holds texts, not image paths: it looks like text (letters,
    no image extension, no folder) and none of its cells names a file. Said in a warning, as
    a path column whose files are all missing would otherwise have been an error."""
    if options.task is not None or options.path_col or options.suffix or options.folder:
        return False
    if not looks_like_text(cells):
        return False
    folder = csv_path.parent
    if any((folder / cell.strip()).is_file() for cell in cells.head(1000)):
        return False
    warnings.warn(f"{name}: column '{cells.name}' names no image files, so it is read as text "
                  "(--task text); if it holds image paths, give --folder or --suffix",
                  ImagefitWarning, stacklevel=3)
    return True


def _separator(path: Path) -> str:
    """The CSV's column separator, read off its header: a comma, else a tab or a semicolon
    (spreadsheets in many locales write ';')."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            header = handle.readline()
    except OSError:
        return ","
    if path.suffix.lower() == ".tsv" or ("\t" in header and "," not in header):
        return "\t"
    return ";" if ";" in header and "," not in header else ","


def _check_repeated_files(paths: list[str], task: Task, targets: np.ndarray, name: str) -> None:
    """A file listed on several rows must carry one label: two labels contradict each other
    (a regression target measured twice trains as given, with a warning)."""
    first_row: dict[str, int] = {}
    for row, path in enumerate(paths):
        first = first_row.setdefault(path, row)
        if first == row or np.array_equal(targets[first], targets[row]):
            continue
        labels = [task.label_text(targets[r]) for r in (first, row)]
        message = (f"{name}: {Path(path).name} is listed with different labels on "
                   f"{line_name(first)} ('{labels[0]}') and {line_name(row)} ('{labels[1]}')")
        if not task.has_classes:
            warnings.warn(message + ": each row trains as given", ImagefitWarning,
                          stacklevel=3)
            return
        raise ImagefitError(message + ": give each file one label (for several labels, one "
                            "row with them joined by ';')")


def read_frame(path: Path) -> pd.DataFrame:
    """A CSV's cells as text, or a clear error when it is unreadable or empty."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True,
                            sep=_separator(path), encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise ImagefitError(f"{path} is not a readable CSV file ({reason}): fix it") from None
    if frame.empty:
        raise ImagefitError(f"{path} has no rows: add one row per image")
    return frame


def require_column(frame: pd.DataFrame, column: str, option: str, name: str) -> str:
    if column not in frame.columns:
        raise ImagefitError(
            f"{name} has no column '{column}' (its columns: {', '.join(frame.columns)}); "
            f"choose one with {option}"
        )
    return column


def read_csv_paths(path: Path, options: SourceOptions) -> list[str]:
    """The image paths of a CSV (``path_col``, default the first column), resolved with
    ``folder`` and ``suffix`` and checked as ``read_csv`` does; no labels needed."""
    frame = read_frame(path)
    column = require_column(frame, options.path_col or frame.columns[0], "--path-col",
                             path.name)
    return _resolve_paths(frame[column].str.strip().tolist(), path, options)


def _read_split(frame: pd.DataFrame, split_col: str | None, name: str) -> np.ndarray:
    if split_col is None:
        return np.full(len(frame), "train", dtype=object)
    values = frame[split_col].str.strip().str.lower()
    bad = ~values.isin(list(SPLIT_ALIASES))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ImagefitError(
            f"{name} {line_name(row)}: split '{frame[split_col].iloc[row]}' in column "
            f"'{split_col}' should be train, valid or test"
        )
    return values.map(SPLIT_ALIASES).to_numpy(dtype=object)


def _resolve_paths(cells: list[str], csv_path: Path, options: SourceOptions) -> list[str]:
    if options.folder:
        folder = Path(options.folder).expanduser()
        if not folder.is_absolute() and not folder.is_dir():
            folder = csv_path.parent / folder
    else:
        folder = csv_path.parent
    paths = [str(folder / (cell + options.suffix)) for cell in cells]
    missing = [(i, p) for i, p in enumerate(paths) if not Path(p).is_file()]
    if missing:
        absolute = all(Path(cells[i]).is_absolute() for i, _ in missing)
        shown = ", ".join(f"{p if Path(cells[i]).is_absolute() else Path(p).name} ({line_name(i)})"
                          for i, p in missing[:3])
        where, check = ("", "the CSV's paths") if absolute else (f" under {folder}", "--folder")
        raise ImagefitError(
            f"{csv_path.name}: {len(missing)} of {len(paths)} image paths do not exist{where} "
            f"(first: {shown}); check {check} and --suffix"
        )
    return paths
