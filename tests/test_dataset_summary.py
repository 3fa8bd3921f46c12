"""The dataset summary of the run report: counts per class and split, exact duplicates within
and across splits, regression and multi-label summaries, plots, and class names as plain text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imagefit.data.cache import CacheSettings, build_cache, cache_arrays
from imagefit.data.sources import read_folder
from imagefit.data.table import from_arrays
from imagefit.report.dataset import summarize_dataset

MEAN, STD = [0.5], [0.25]


def distinct_images(count: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """``count`` grey images that differ pairwise (each carries its index in two pixels)."""
    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 1),
                                                  dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count) % 256
    images[:, 0, 1, 0] = np.arange(count) // 256
    return images


def write_image(path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def split_rows(table) -> dict[str, np.ndarray]:
    return {s: table.rows(s) for s in ("train", "valid", "test")}


def summarize(table, cache, tmp_path, **kwargs) -> dict:
    summary = summarize_dataset(table, cache, split_rows(table), MEAN, STD,
                                tmp_path / "plots", **kwargs)
    json.dumps(summary, allow_nan=False)
    return summary


def assert_plots(summary: dict, tmp_path, expected: set[str]) -> None:
    files = {row["file"] for row in summary["plots"]}
    assert files == {f"plots/{name}" for name in expected}
    for name in files:
        with Image.open(tmp_path / name) as image:
            assert image.width > 200 and image.height > 150
            assert len(image.convert("L").getcolors(1 << 16) or range(257)) > 2


def test_class_counts_per_split(tmp_path):
    targets = np.array([0] * 5 + [1] * 3 + [2] * 2 + [0, 1] + [2, 2, 2])
    split = ["train"] * 10 + ["valid"] * 2 + ["test"] * 3
    table = from_arrays(distinct_images(15), targets, names=["cat", "dog", "eel"], split=split)
    summary = summarize(table, cache_arrays(table.arrays, CacheSettings(8, 1)), tmp_path)

    assert summary["class_counts"] == [
        {"class": "cat", "train": 5, "valid": 1, "test": 0},
        {"class": "dog", "train": 3, "valid": 1, "test": 0},
        {"class": "eel", "train": 2, "valid": 0, "test": 3},
    ]
    assert summary["split_sizes"] == [{"split": "train", "images": 10},
                                      {"split": "valid", "images": 2},
                                      {"split": "test", "images": 3}]
    assert summary["n_images"] == 15 and summary["unreadable"] == 0
    assert summary["normalization"] == [{"channel": "grey", "mean": 0.5, "std": 0.25}]
    assert summary["duplicate_images"] == 0 and summary["duplicate_groups"] == 0
    assert summary["distinct_sizes"] == 1 and summary["most_common_size"] == "8x8"
    assert summary["most_common_size_share"] == 1.0
    assert_plots(summary, tmp_path, {"data_classes.png", "data_samples.png"})


def test_planted_duplicates_are_counted_exactly(tmp_path):
    images = distinct_images(40)
    images[5] = images[1]                 # within train: a group of three
    images[9] = images[1]
    images[12] = images[2]                # within train: a pair, labelled differently
    images[31] = images[3]                # train and valid
    images[32] = images[3]
    images[33] = images[4]                # train and valid
    images[38] = images[30]               # within valid
    targets = np.arange(40) % 4
    targets[12] = (targets[2] + 1) % 4
    split = ["train"] * 30 + ["valid"] * 10
    table = from_arrays(images, targets, split=split)
    summary = summarize(table, cache_arrays(table.arrays, CacheSettings(8, 1)), tmp_path)

    assert summary["duplicate_images"] == 7
    assert summary["duplicate_groups"] == 5
    assert summary["duplicate_label_conflicts"] == 3
    cross = {row["splits"]: row for row in summary["cross_split_duplicates"]}
    assert cross["train-valid"] == {"splits": "train-valid", "groups": 2, "leaked_images": 3}
    assert cross["train-test"]["groups"] == cross["valid-test"]["groups"] == 0
    shown = {tuple(row["rows"]) for row in summary["duplicate_examples"]}
    assert shown == {(3, 31, 32), (4, 33)}


def test_unreadable_files_are_left_out(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        for i in range(4):
            image = rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)
            paths.append(str(write_image(tmp_path / "data" / name / f"{i}.png", image)))
    paths.append(str(write_image(tmp_path / "data" / "a" / "copy.png",
                                 np.asarray(Image.open(paths[0])))))
    (tmp_path / "data" / "b" / "broken.png").write_bytes(b"not an image")
    table = read_folder(tmp_path / "data")
    cache = build_cache(table.paths, CacheSettings(8, 3), tmp_path / "cache", progress=False)
    summary = summarize(table, cache, tmp_path)

    assert summary["unreadable"] == 1 and summary["n_images"] == 9
    assert summary["duplicate_images"] == 1 and summary["duplicate_groups"] == 1
    assert {row["dimension"]: (row["min"], row["max"])
            for row in summary["original_sizes"]} == {"width": (10, 10), "height": (12, 15)}
    assert summary["distinct_sizes"] == 4
    assert summary["most_common_size_share"] == pytest.approx(3 / 9)
    assert_plots(summary, tmp_path, {"data_classes.png", "data_sizes.png", "data_samples.png"})


def test_regression_summary(tmp_path):
    targets = np.linspace(-2.0, 8.0, 30)
    split = ["train"] * 20 + ["valid"] * 10
    table = from_arrays(distinct_images(30), targets, split=split)
    summary = summarize(table, cache_arrays(table.arrays, CacheSettings(8, 1)), tmp_path)

    stats = {row["split"]: row for row in summary["target_stats"]}
    assert stats["train"]["min"] == pytest.approx(-2.0)
    assert stats["valid"]["max"] == pytest.approx(8.0)
    assert stats["test"]["images"] == 0 and stats["test"]["mean"] is None
    assert_plots(summary, tmp_path, {"data_targets.png", "data_samples.png"})


def test_multilabel_summary(tmp_path):
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 1]],
                       dtype=np.float32)
    table = from_arrays(distinct_images(6), targets, task="multilabel",
                        names=["sky", "sea", "sun"], split=["train"] * 4 + ["valid"] * 2)
    summary = summarize(table, cache_arrays(table.arrays, CacheSettings(8, 1)), tmp_path)

    assert summary["label_counts"][0] == {"label": "sky", "train": 2, "valid": 1, "test": 0}
    assert summary["labels_per_image"] == [
        {"labels": 0, "train": 1, "valid": 0, "test": 0},
        {"labels": 1, "train": 1, "valid": 1, "test": 0},
        {"labels": 2, "train": 1, "valid": 1, "test": 0},
        {"labels": 3, "train": 1, "valid": 0, "test": 0},
    ]
    assert_plots(summary, tmp_path, {"data_classes.png", "data_labels_per_image.png",
                                     "data_samples.png"})


def test_many_and_hostile_class_names(tmp_path):
    names = ["<script>alert(1)</script>", "$\\frac{1}{0$ & $x$", "line\nbreak", "x" * 200,
             *(f"class {i}" for i in range(116))]
    targets = np.arange(240) % len(names)
    table = from_arrays(distinct_images(240), targets, names=names)
    summary = summarize(table, cache_arrays(table.arrays, CacheSettings(8, 1)), tmp_path,
                        samples_per_class=2)

    assert summary["class_counts"][0]["class"] == names[0]
    assert summary["n_classes"] == 120
    assert any("first 20 of 120" in note for note in summary["notes"])
    assert_plots(summary, tmp_path, {"data_classes.png", "data_samples.png"})
