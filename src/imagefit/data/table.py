"""The table every source becomes: items (image paths, rows of an in-memory uint8 array, or
short texts), their targets, their splits and the task; and ``from_arrays``, which makes one
from arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ImagefitError
from ..tasks import Task, task_class

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "val": "valid",
                 "validation": "valid", "test": "test"}


@dataclass
class Table:
    """Items (image paths or rows of an in-memory uint8 array), their targets and splits.

    ``split`` holds 'train', 'valid' or 'test' per row; a source without a validation split
    leaves every labelled training row 'train' and ``splits.assign_validation`` carves one.
    """

    task: Task
    targets: np.ndarray
    split: np.ndarray
    paths: list[str] | None = None
    arrays: np.ndarray | None = None
    description: str = ""
    texts: list[str] | None = None  # a text table's strings (see data.text)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, rows: np.ndarray) -> Table:
        """The table restricted to ``rows`` (a boolean mask or indices)."""
        index = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return replace(
            self,
            targets=self.targets[index],
            split=self.split[index],
            paths=None if self.paths is None else [self.paths[i] for i in index],
            arrays=None if self.arrays is None else self.arrays[index],
            texts=None if self.texts is None else [self.texts[i] for i in index],
        )

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def has_split(self, split: str) -> bool:
        return bool((self.split == split).any())


def check_float32(values: np.ndarray, where) -> None:
    """Refuse targets beyond float32's range (about 3.4e38), which training computes in:
    they would become infinite and the loss NaN. ``where(row, column)`` names a value."""
    beyond = np.abs(values) > np.finfo(np.float32).max
    if beyond.any():
        row, col = (int(v[0]) for v in np.nonzero(beyond.reshape(len(values), -1)))
        raise ImagefitError(f"{where(row, col)}, beyond the range of 32-bit floats (about "
                            "3.4e38) that training uses: rescale the targets (e.g. divide "
                            "them by a power of ten) or fix the value")


def to_uint8_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images as uint8 (N, H, W, C): accepts (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1, 3,
    4; uint8 values, or floats in [0, 1]."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(
        images
    )
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ImagefitError(
            f"images have shape {array.shape}: give (N, H, W), (N, H, W, C) or (N, C, H, W)"
        )
    if array.shape[-1] not in (1, 3, 4) and array.shape[1] in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] == 4:
        array = array[..., :3]
    if array.shape[-1] not in (1, 3):
        raise ImagefitError(f"images have {array.shape[-1]} channels: give 1 (grey) or 3 (RGB)")
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if array.min() < 0 or array.max() > 1:
            raise ImagefitError(
                "float images must hold values in [0, 1]; give uint8 images for 0..255"
            )
        array = np.round(array * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def from_arrays(
    images: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor | Sequence,
    *,
    task: str | None = None,
    names: Sequence[str] | None = None,
    split: Sequence[str] | None = None,
    description: str = "arrays",
) -> Table:
    """A table from in-memory images and targets.

    Integer targets (N,) are class indices; float targets are regression values, or a
    multi-label 0/1 matrix when ``task='multilabel'``. ``names`` names the classes or targets.
    """
    array = to_uint8_images(images)
    values = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    if len(values) != len(array):
        raise ImagefitError(f"{len(array)} images but {len(values)} targets: give one per image")
    if task is None:
        task = "classification" if np.issubdtype(values.dtype, np.integer) else "regression"
    kind = task_class(task)
    if kind.single_label:
        values = values.astype(np.int64)
        count = int(values.max()) + 1 if len(values) else 0
        names = list(names) if names is not None else [str(i) for i in range(count)]
        if len(names) < count:
            raise ImagefitError(f"targets reach class {count - 1} but only {len(names)} names")
    else:
        if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
            raise ImagefitError("targets hold NaN or infinite values: give finite numbers")
        check_float32(np.asarray(values, dtype=np.float64).reshape(len(values), -1),
                       lambda row, col: f"target {row} (column {col}) is "
                       f"{np.asarray(values).reshape(len(values), -1)[row, col]}")
        values = values.astype(np.float32).reshape(len(values), -1)
        names = list(names) if names is not None else [
            f"label_{i}" if kind.multi_label else f"target_{i}"
            for i in range(values.shape[1])
        ]
    split_array = np.full(len(array), "train", dtype=object) if split is None else np.asarray(
        [SPLIT_ALIASES.get(str(s).lower(), str(s)) for s in split], dtype=object
    )
    unknown = sorted(set(split_array) - set(SPLITS))
    if unknown:
        raise ImagefitError(f"split values {unknown} unknown: use train, valid or test")
    return Table(
        task=Task(task, names),
        targets=values,
        split=split_array,
        arrays=array,
        description=description,
    )
