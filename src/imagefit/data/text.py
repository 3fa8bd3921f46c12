"""Text items: a CSV column of short strings (names, words) read into a ``Table``, the
character vocabulary of its training split, and the strings as rows of character indices
padded or cut to one length: the text counterpart of the image cache."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..errors import ImagefitError, ImagefitWarning
from .table import Table

# The indices before the vocabulary's characters. The padding after a text also marks its
# end for the convolutions (its embedding is zero), so a filter can tell a name's last letters
# (an ending such as -a) from the same letters inside it: boundary marks of their own were
# measured to add nothing (bench/text.py's data, 2 seeds, 5 and 10 epochs).
PAD, UNKNOWN = 0, 1
SPECIAL = 2
DEFAULT_PERCENTILE = 99.0
# The automatic length's ceiling. The char CNN reads short texts (names, words), and a step's
# time and memory grow with the length: a step of 128 texts took 0.70 s at 256 characters and
# 0.055 s at 12 (one CPU thread), 4.5 s at 1,000. --text-length reads longer texts.
TEXT_LENGTH_CEILING = 256
# A percentile length over this many times the median is set by a few long texts (two rows of
# 100,000 characters among 200 names made the 99th percentile 39,006 characters, an epoch
# 240 s instead of 0.1 s): the length is then the percentile of the other texts.
OUTLIER_FACTOR = 10
IMAGE_LIKE = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def looks_like_text(cells: pd.Series) -> bool:
    """Whether a column holds short strings rather than image paths: some cell has a letter,
    and no cell ends with an image extension or holds a path separator."""
    values = cells.astype(str)
    if not values.str.contains(r"[^\W\d_]", regex=True).any():
        return False
    lowered = values.str.lower()
    return not (lowered.str.endswith(IMAGE_LIKE).any() or values.str.contains("/").any()
                or values.str.contains("\\\\", regex=True).any())


def check_texts(cells: pd.Series, name: str, column: str) -> list[str]:
    """The column's strings, or a one-line error naming the first empty cell, or the column
    when it holds only numbers."""
    values = cells.astype(str)
    empty = np.flatnonzero((values.str.strip() == "").to_numpy())
    if len(empty):
        more = f" ({len(empty)} such rows)" if len(empty) > 1 else ""
        raise ImagefitError(f"{name} line {int(empty[0]) + 2}: the text in column '{column}' is "
                            f"empty{more}; fill it or remove the row")
    numeric = pd.to_numeric(values, errors="coerce").notna()
    if numeric.all():
        raise ImagefitError(f"{name}: column '{column}' holds numbers, not text (e.g. "
                            f"'{values.iloc[0]}'): give the column of strings with --text-col")
    return values.str.strip().tolist()


@dataclass
class Vocabulary:
    """The characters seen in training, each with its index (after ``PAD`` and ``UNKNOWN``);
    a character first seen elsewhere reads as ``UNKNOWN``."""

    characters: str
    lowercase: bool = True
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {c: k + SPECIAL for k, c in enumerate(self.characters)}

    @classmethod
    def from_texts(cls, texts: Sequence[str], lowercase: bool = True) -> Vocabulary:
        seen = set().union(*((t.lower() if lowercase else t) for t in texts)) if texts else set()
        return cls("".join(sorted(seen)), lowercase)

    def __len__(self) -> int:
        """Indices in use: padding, unknown and the characters."""
        return len(self.characters) + SPECIAL

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """(N, length) int64: each text's character indices from the start, cut at
        ``length`` or padded with ``PAD``."""
        codes = np.full((len(texts), length), PAD, dtype=np.int64)
        get = self._index.get
        for row, text in enumerate(texts):
            text = text.lower() if self.lowercase else text
            codes[row, :min(len(text), length)] = [get(c, UNKNOWN) for c in text[:length]]
        return codes

    def to_dict(self) -> dict:
        return {"characters": self.characters, "lowercase": self.lowercase}


def text_length(texts: Sequence[str], percentile: float = DEFAULT_PERCENTILE) -> int:
    """The length that holds ``percentile`` % of ``texts`` whole (at least 1)."""
    lengths = np.array([len(t) for t in texts]) if len(texts) else np.ones(1)
    return max(1, int(np.ceil(np.percentile(lengths, percentile))))


def automatic_text_length(texts: Sequence[str], percentile: float = DEFAULT_PERCENTILE) -> int:
    """The length texts are read at when --text-length is not given: the ``percentile`` of the
    lengths of ``texts``, of those up to OUTLIER_FACTOR times the median when a few longer
    ones would set it, and at most TEXT_LENGTH_CEILING. Warns when either rule changed it."""
    length = text_length(texts, percentile)
    median = float(np.median([len(t) for t in texts])) if len(texts) else 1.0
    limit = OUTLIER_FACTOR * max(median, 1.0)
    if length > limit:
        kept = [t for t in texts if len(t) <= limit]
        chosen = text_length(kept, percentile)
        warnings.warn(
            f"--text-length: {len(texts) - len(kept)} of {len(texts)} training texts are over "
            f"{OUTLIER_FACTOR}x the median length ({median:g} characters) and would make the "
            f"--text-percentile {percentile:g} length {length}: texts are read up to {chosen} "
            "characters, that percentile of the others; give --text-length to read more",
            ImagefitWarning, stacklevel=2)
        length = chosen
    if length > TEXT_LENGTH_CEILING:
        warnings.warn(
            f"--text-length: the --text-percentile {percentile:g} of the training texts' lengths "
            f"is {length} characters, over the automatic length's ceiling of "
            f"{TEXT_LENGTH_CEILING} (the char CNN reads short texts; a step's time and memory "
            f"grow with the length): texts are cut at {TEXT_LENGTH_CEILING}; give "
            "--text-length to read more", ImagefitWarning, stacklevel=2)
        length = TEXT_LENGTH_CEILING
    return length


class TextCache:
    """The encoded texts as the image cache is asked for them: ``tensor()`` gives the rows
    (N, length) of character indices; nothing fails to read."""

    def __init__(self, codes: np.ndarray, built_seconds: float) -> None:
        self.images = codes
        self._tensor = torch.from_numpy(codes)
        self.errors: dict[int, str] = {}
        self.failed = np.zeros(0, dtype=np.int64)
        self.built_seconds = built_seconds

    def tensor(self) -> torch.Tensor:
        return self._tensor

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class PreparedText:
    """A table's texts encoded with the training split's vocabulary, as ``PreparedImages``
    holds images: every row is usable."""

    cache: TextCache
    usable: np.ndarray
    vocabulary: Vocabulary
    length: int
    percentile: float | None

    def rows(self, table: Table, split: str) -> np.ndarray:
        return np.flatnonzero((table.split == split) & self.usable)

    def settings(self) -> dict:
        """What model.json records to read new texts as these were read."""
        return {**self.vocabulary.to_dict(), "length": self.length,
                "percentile": self.percentile}


def prepare_texts(table: Table, *, length: int | None = None,
                  percentile: float = DEFAULT_PERCENTILE, lowercase: bool = True,
                  vocabulary: Vocabulary | None = None) -> PreparedText:
    """Encode a text table: the vocabulary (unless given) and the length (unless given:
    ``automatic_text_length`` of the training texts) come from its training rows only."""
    started = time.perf_counter()
    training = [table.texts[r] for r in np.flatnonzero(table.split == "train")]
    vocabulary = vocabulary or Vocabulary.from_texts(training, lowercase)
    chosen = None if length else percentile
    length = length or automatic_text_length(training, percentile)
    codes = vocabulary.encode(table.texts, length)
    return PreparedText(TextCache(codes, time.perf_counter() - started),
                        np.ones(len(table), dtype=bool), vocabulary, length, chosen)


def text_summary(table: Table, prepared: PreparedText, splits: dict[str, np.ndarray]) -> dict:
    """What data_summary.json says of text: rows and lengths per split, how many are cut,
    the vocabulary, unknown characters outside training, and texts repeated across
    splits."""
    lengths = np.array([len(t) for t in table.texts])
    summary: dict = {"input": "text", "length": prepared.length,
                     "percentile": prepared.percentile,
                     "vocabulary_size": len(prepared.vocabulary.characters),
                     "characters": prepared.vocabulary.characters, "splits": {}}
    seen = {t.lower() if prepared.vocabulary.lowercase else t
            for t in (table.texts[r] for r in splits.get("train", []))}
    for name, rows in splits.items():
        if not len(rows):
            continue
        codes = prepared.cache.images[rows]
        part = lengths[rows]
        entry = {"rows": int(len(rows)), "length_median": float(np.median(part)),
                 "length_max": int(part.max()), "cut": int((part > prepared.length).sum()),
                 "unknown_characters": int((codes == UNKNOWN).sum())}
        if table.task.single_label:
            counts = np.bincount(table.targets[rows], minlength=len(table.task.names))
            entry["classes"] = dict(zip(table.task.names, counts.tolist()))
        if name != "train":
            texts = (table.texts[r] for r in rows)
            entry["also_in_train"] = sum(
                (t.lower() if prepared.vocabulary.lowercase else t) in seen for t in texts)
        summary["splits"][name] = entry
    return summary
