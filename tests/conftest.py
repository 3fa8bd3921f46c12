"""Shared fixtures: small generated image folders and CSV files, and an isolated cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own image cache and data home; nothing touches ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("IMAGEFIT_CACHE", str(root / "images"))
    monkeypatch.setenv("IMAGEFIT_HOME", str(root / "home"))
    monkeypatch.setenv("IMAGEFIT_OFFLINE", "1")
    return root


def shape_image(kind: int, size: int, rng: np.random.Generator, rgb: bool) -> np.ndarray:
    """A learnable picture: class 0 a bright square, 1 a horizontal bar, 2 a vertical bar."""
    image = rng.integers(0, 60, (size, size), dtype=np.uint8)
    lo, hi = size // 4, size - size // 4
    if kind == 0:
        image[lo:hi, lo:hi] = 230
    elif kind == 1:
        image[size // 2 - 2:size // 2 + 2, :] = 230
    else:
        image[:, size // 2 - 2:size // 2 + 2] = 230
    if rgb:
        image = np.stack([image, image // 2, 255 - image], axis=-1)
    return image


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path) -> Path:
    """tmp/shapes/{square,hbar,vbar}/*: PNG and JPEG, grey and RGB, sizes 20-40 px."""
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for kind, name in enumerate(["square", "hbar", "vbar"]):
        for i in range(24):
            size = int(rng.integers(20, 41))
            rgb = i % 3 == 0
            suffix = ".jpg" if i % 2 else ".png"
            write_image(root / name / f"{name}_{i}{suffix}", shape_image(kind, size, rng, rgb))
    return root


@pytest.fixture
def labelled_images(tmp_path) -> tuple[Path, list[str], np.ndarray]:
    """60 grey 24 px PNGs under tmp/images, their file names and their kinds (0, 1, 2)."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    kinds = np.arange(60) % 3
    names = []
    for i, kind in enumerate(kinds):
        names.append(f"img_{i}.png")
        write_image(folder / names[-1], shape_image(int(kind), 24, rng, rgb=False))
    return folder, names, kinds
