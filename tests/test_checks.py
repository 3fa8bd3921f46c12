"""Data that cannot train is refused before a run directory exists, with one line naming the
class, rows or target; copies across splits are a warning and a note in metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagefit
from conftest import shape_image, write_image
from imagefit.errors import ImagefitError, ImagefitWarning


def shapes_csv(folder: Path, labels: list[str], splits: list[str] | None = None,
               column: str = "label") -> Path:
    rng = np.random.default_rng(0)
    rows = [f"file,{column}" + (",split" if splits else "")]
    for i, label in enumerate(labels):
        write_image(folder / f"im{i}.png", shape_image(i % 3, 16, rng, rgb=False))
        rows.append(f"im{i}.png,{label}" + (f",{splits[i]}" if splits else ""))
    path = folder / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def fit(data, runs_dir: Path, **options):
    return imagefit.fit(data, runs_dir=str(runs_dir), epochs=1, progress=False, report=False,
                        **options)


def assert_no_run(runs_dir: Path) -> None:
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_a_single_class_folder_is_refused_before_a_run_exists(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        write_image(tmp_path / "data" / "cat" / f"{i}.png", shape_image(0, 16, rng, False))
    with pytest.raises(ImagefitError, match=r"every training image has the label 'cat': a "
                       r"classifier needs at least two classes: add images of another class"):
        fit(tmp_path / "data", tmp_path / "runs")
    assert_no_run(tmp_path / "runs")


def test_a_constant_integer_target_says_there_is_nothing_to_learn(tmp_path):
    path = shapes_csv(tmp_path, ["30"] * 12, column="age")
    with pytest.raises(ImagefitError, match=r"label '30'.* holds the number 30 throughout, so "
                       r"there is nothing to learn: give targets that vary"):
        fit(path, tmp_path / "runs")
    assert_no_run(tmp_path / "runs")


def test_a_constant_regression_target_is_refused(tmp_path):
    path = shapes_csv(tmp_path, ["2.5"] * 12, column="age")
    with pytest.raises(ImagefitError, match=r"regression target 'age' is 2.5 for every training "
                       r"image: there is nothing to learn"):
        fit(path, tmp_path / "runs")


def test_a_class_whose_images_are_all_unreadable_is_named(tmp_path):
    path = shapes_csv(tmp_path, ["a", "b", "a", "b", "a", "b", "a", "b", "c", "c"])
    for i in (8, 9):
        (tmp_path / f"im{i}.png").write_bytes(b"not an image")
    with pytest.raises(ImagefitError, match=r"class 'c' has no training images \(its \d "
                       r"training image\(s\) cannot be read, e.g. .*im\d.png\): add readable "
                       r"training images of it"):
        fit(path, tmp_path / "runs", valid_pct=0.0)
    assert_no_run(tmp_path / "runs")


def test_a_class_only_in_validation_is_named_with_its_split(tmp_path):
    labels = ["a", "b", "c"] * 4
    splits = ["valid" if label == "c" else "train" for label in labels]
    path = shapes_csv(tmp_path, labels, splits)
    with pytest.raises(ImagefitError, match=r"class 'c' has no training images \(its images "
                       r"are 4 in valid only\): add readable training images of it, or remove "
                       r"its rows"):
        fit(path, tmp_path / "runs")


def test_rows_all_in_test_say_to_mark_training_rows(tmp_path):
    path = shapes_csv(tmp_path, ["a", "b"] * 4, ["test"] * 8)
    with pytest.raises(ImagefitError, match=r"data.csv has no training rows \(8 test\): mark "
                       r"the rows to learn from as 'train' in its split column"):
        fit(path, tmp_path / "runs")


def test_multilabel_without_any_label_is_refused(tmp_path):
    path = shapes_csv(tmp_path, ["0"] * 6, column="tag")
    path.write_text(path.read_text().replace("file,tag", "file,cloud,water").replace(
        ",0\n", ",0,0\n"))
    with pytest.raises(ImagefitError, match="no training image has any label"):
        fit(path, tmp_path / "runs", task="multilabel")


def test_copies_across_splits_warn_and_are_recorded(tmp_path):
    labels = ["a", "b", "c"] * 4
    splits = ["valid" if i % 4 == 0 else "train" for i in range(12)]
    path = shapes_csv(tmp_path, labels, splits)
    path.write_text(path.read_text() + "im1.png,b,valid\n")  # a training image again
    with pytest.warns(ImagefitWarning, match=r"exact copies across splits: 1 valid image\(s\) "
                      r"copy train ones \(e.g. .*im1.png, listed twice\): their figures are "
                      r"optimistic; remove the copies"):
        result = fit(path, tmp_path / "runs")
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["leaks"]["copies_across_splits"] == {"train-valid": 1}


def test_identical_pixels_in_different_files_count_as_copies(tmp_path):
    labels = ["a", "b", "c"] * 4
    splits = ["test" if i == 11 else "train" for i in range(12)]
    path = shapes_csv(tmp_path, labels, splits)
    Image.open(tmp_path / "im2.png").save(tmp_path / "im11.png")
    with pytest.warns(ImagefitWarning, match=r"1 test image\(s\) copy train ones \(e.g. "
                      r".*im2.png = .*im11.png\)"):
        fit(path, tmp_path / "runs", valid_pct=0.0)


def test_clean_data_has_no_leak_note(tmp_path, recwarn):
    path = shapes_csv(tmp_path, ["a", "b", "c"] * 4)
    result = fit(path, tmp_path / "runs", valid_pct=0.25)
    assert "leaks" not in json.loads((result.run_dir / "metrics.json").read_text())
    assert not [w for w in recwarn if "copies" in str(w.message)]
