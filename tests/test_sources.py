"""Reading folders, CSV files and arrays into tables, and the errors users get for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagefit.config import SourceOptions
from imagefit.data.sources import read_source
from imagefit.data.splits import assign_validation
from imagefit.data.table import from_arrays, to_uint8_images
from imagefit.errors import ImagefitError, ImagefitWarning


def tiny_png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
    return path


def class_tree(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        for i in range(count):
            tiny_png(root / name / f"{name}_{i}.png", i)
    return root


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def csv_with_images(tmp_path: Path, header: str, labels: list[str], name: str = "data.csv"):
    """A CSV whose first column names existing PNGs next to it, followed by ``labels``."""
    rows = []
    for i, label in enumerate(labels):
        tiny_png(tmp_path / f"im{i}.png", i)
        rows.append(f"im{i}.png,{label}")
    return write_csv(tmp_path / name, header, rows)


def read(path, **options):
    return read_source(path, SourceOptions(**options))


# -- folders ------------------------------------------------------------------------------


def test_class_folders_become_sorted_classes(class_folder):
    table = read_source(class_folder)
    assert table.task.kind == "classification"
    assert table.task.names == ["hbar", "square", "vbar"]
    assert len(table) == 72
    assert table.paths is not None and table.arrays is None
    for path, target in zip(table.paths, table.targets, strict=True):
        assert Path(path).parent.name == table.task.names[target]
    assert set(table.split) == {"train"}
    assert table.targets.dtype == np.int64


def test_class_order_does_not_depend_on_creation_order(tmp_path):
    class_tree(tmp_path / "data", {"zebra": 2, "Apple": 2, "mango": 2})
    assert read_source(tmp_path / "data").task.names == ["Apple", "mango", "zebra"]


def test_hidden_files_and_folders_are_ignored(tmp_path):
    root = class_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    tiny_png(root / ".ipynb_checkpoints" / "x.png")
    tiny_png(root / "dog" / ".cache" / "y.png")
    table = read_source(root)
    assert table.task.names == ["cat", "dog"]
    assert len(table) == 4
    assert not any("/." in p for p in table.paths)


def test_nested_files_in_a_class_folder_belong_to_it(tmp_path):
    root = class_tree(tmp_path / "data", {"cat": 1, "dog": 1})
    tiny_png(root / "cat" / "more" / "deep.png")
    table = read_source(root)
    assert sorted(table.targets.tolist()) == [0, 0, 1]


def test_train_valid_test_layout_gives_splits(tmp_path):
    root = tmp_path / "data"
    class_tree(root / "train", {"a": 3, "b": 3})
    class_tree(root / "val", {"a": 2, "b": 1})
    class_tree(root / "test", {"a": 1, "b": 2})
    table = read_source(root)
    assert table.task.names == ["a", "b"]
    assert (table.split == "train").sum() == 6
    assert (table.split == "valid").sum() == 3
    assert (table.split == "test").sum() == 3
    for path, split in zip(table.paths, table.split, strict=True):
        folder = Path(path).parent.parent.name
        assert {"train": "train", "val": "valid", "test": "test"}[folder] == split
    # a source with its own validation split keeps it
    assert assign_validation(table, 0.5, seed=0) is table


def test_valid_split_may_miss_classes_but_not_add_them(tmp_path):
    root = tmp_path / "data"
    class_tree(root / "train", {"a": 2, "b": 2})
    class_tree(root / "valid", {"a": 1})
    assert (read_source(root).split == "valid").sum() == 1
    class_tree(root / "test", {"c": 1, "d": 1})
    with pytest.raises(ImagefitError, match="train/ lacks") as info:
        read_source(root)
    message = str(info.value)
    assert str(root / "test") in message and "c, d" in message
    assert "give every class training images" in message


def test_test_folder_without_classes_warns_and_is_left_out(tmp_path):
    root = tmp_path / "data"
    class_tree(root / "train", {"a": 2, "b": 2})
    tiny_png(root / "test" / "unlabelled.png")
    with pytest.warns(ImagefitWarning, match="imagefit predict"):
        table = read_source(root)
    assert len(table) == 4 and not table.has_split("test")


def test_empty_class_folder_is_an_error(tmp_path):
    root = class_tree(tmp_path / "data", {"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / ".DS_Store").write_bytes(b"")
    with pytest.raises(ImagefitError, match="holds no images") as info:
        read_source(root)
    assert str(root / "dog") in str(info.value)
    assert "add images or remove the folder" in str(info.value)


def test_folder_of_images_without_class_folders_is_an_error(labelled_images):
    folder, _, _ = labelled_images
    with pytest.raises(ImagefitError, match="no class folders") as info:
        read_source(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "subfolder named after the class" in message and "CSV" in message


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImagefitError, match="is empty") as info:
        read_source(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_missing_data_path_is_an_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ImagefitError, match="not found") as info:
        read_source(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "folder" in message and "CSV" in message and "builtin:digits" in message


def test_unknown_builtin_lists_the_choices():
    with pytest.raises(ImagefitError, match="unknown built-in dataset 'mnistt'") as info:
        read_source("builtin:mnistt")
    assert "builtin:digits" in str(info.value) and "builtin:fashion-mnist" in str(info.value)


def test_builtin_digits():
    table = read_source("builtin:digits")
    assert table.task.kind == "classification"
    assert table.task.names == [str(i) for i in range(10)]
    assert table.arrays.shape == (1797, 8, 8, 1) and table.arrays.dtype == np.uint8
    assert table.arrays.max() == 255


def test_forcing_another_task_on_a_folder_is_an_error(class_folder):
    assert read(class_folder, task="classification").task.kind == "classification"
    with pytest.raises(ImagefitError, match="--task regression does not fit") as info:
        read(class_folder, task="regression")
    assert "CSV" in str(info.value)


# -- CSV: classification ------------------------------------------------------------------


def test_csv_path_and_label_column(tmp_path):
    csv = csv_with_images(tmp_path, "file,label", ["dog", "cat", " dog", "bird"])
    table = read_source(csv)
    assert table.task.kind == "classification"
    assert table.task.names == ["bird", "cat", "dog"]
    assert table.targets.tolist() == [2, 1, 2, 0]
    assert table.paths == [str(tmp_path / f"im{i}.png") for i in range(4)]


def test_csv_integer_labels_are_classes_in_numeric_order(tmp_path):
    csv = csv_with_images(tmp_path, "file,label", ["10", "2", "0", "2", "1"])
    table = read_source(csv)
    assert table.task.kind == "classification"
    assert table.task.names == ["0", "1", "2", "10"]
    assert table.targets.tolist() == [3, 2, 0, 2, 1]


def test_csv_many_integer_classes_warn_about_regression(tmp_path):
    csv = csv_with_images(tmp_path, "file,label", [str(i) for i in range(60)])
    with pytest.warns(ImagefitWarning, match="--task regression"):
        table = read_source(csv)
    assert table.task.kind == "classification" and table.task.n_out == 60


def test_csv_one_hot_kaggle_style_with_folder_and_suffix(tmp_path, monkeypatch):
    # plant-pathology: image_id,healthy,multiple_diseases,rust,scab with ids lacking '.jpg'
    rows = ["Train_0,0,0,0,1", "Train_1,0,1,0,0", "Train_2,1,0,0,0", "Train_3,0,0,1,0"]
    for i in range(4):
        image = Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8))
        (tmp_path / "images").mkdir(exist_ok=True)
        image.save(tmp_path / "images" / f"Train_{i}.jpg")
    csv = write_csv(tmp_path / "train.csv", "image_id,healthy,multiple_diseases,rust,scab", rows)
    monkeypatch.chdir(tmp_path.parent)  # 'images' is found next to the CSV, not in the cwd
    table = read(csv, folder="images", suffix=".jpg")
    assert table.task.kind == "classification"
    assert table.task.names == ["healthy", "multiple_diseases", "rust", "scab"]
    assert table.targets.tolist() == [3, 1, 0, 2]
    assert table.paths[0] == str(tmp_path / "images" / "Train_0.jpg")


def test_csv_folder_option_accepts_an_absolute_folder(tmp_path):
    tiny_png(tmp_path / "elsewhere" / "a.png")
    tiny_png(tmp_path / "elsewhere" / "b.png")
    csv = write_csv(tmp_path / "csvs" / "data.csv", "name,label", ["a,x", "b,y"])
    table = read(csv, folder=str(tmp_path / "elsewhere"), suffix=".png")
    assert table.paths == [str(tmp_path / "elsewhere" / n) for n in ("a.png", "b.png")]


def test_csv_one_hot_with_several_ones_is_multilabel(tmp_path):
    csv = csv_with_images(tmp_path, "file,cat,dog,bird", ["1,0,0", "1,1,0", "0,0,0", "0,1,1"])
    table = read_source(csv)
    assert table.task.kind == "multilabel"
    assert table.task.names == ["cat", "dog", "bird"]
    assert table.targets.dtype == np.float32
    np.testing.assert_array_equal(
        table.targets, [[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1]]
    )


def test_csv_one_hot_forced_classification_names_the_bad_row(tmp_path):
    csv = csv_with_images(tmp_path, "file,cat,dog", ["1,0", "0,1", "1,1"])
    with pytest.raises(ImagefitError, match="line 4") as info:
        read(csv, task="classification")
    message = str(info.value)
    assert "data.csv" in message and "exactly one 1" in message and "found 2" in message
    assert "--task multilabel" in message


def test_csv_several_text_label_columns_is_an_error(tmp_path):
    csv = csv_with_images(tmp_path, "file,colour,shape", ["red,round", "blue,square"])
    with pytest.raises(ImagefitError, match="colour, shape") as info:
        read_source(csv)
    assert "--label-col" in str(info.value) and "data.csv" in str(info.value)


def test_csv_delimited_labels_are_multilabel(tmp_path):
    csv = csv_with_images(tmp_path, "file,tags", ["sky;sea", "sea", "", "tree; sky"])
    table = read_source(csv)
    assert table.task.kind == "multilabel"
    assert table.task.names == ["sea", "sky", "tree"]
    np.testing.assert_array_equal(
        table.targets, [[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1]]
    )


def test_csv_pipe_and_custom_delimiters(tmp_path):
    csv = csv_with_images(tmp_path, "file,tags", ["a|b", "b"])
    assert read_source(csv).task.names == ["a", "b"]
    csv = csv_with_images(tmp_path, "file,tags", ["a b", "b"], name="spaced.csv")
    table = read(csv, label_delim=" ")
    assert table.task.kind == "multilabel" and table.task.names == ["a", "b"]


def test_csv_label_col_and_path_col_choose_columns(tmp_path):
    tiny_png(tmp_path / "a.png")
    tiny_png(tmp_path / "b.png")
    csv = write_csv(tmp_path / "data.csv", "id,species,file,weight",
                    ["1,cat,a.png,3.5", "2,dog,b.png,10.25"])
    table = read(csv, path_col="file", label_col=["species"])
    assert table.task.names == ["cat", "dog"] and table.targets.tolist() == [0, 1]
    table = read(csv, path_col="file", label_col=["weight"])
    assert table.task.kind == "regression"
    np.testing.assert_allclose(table.targets[:, 0], [3.5, 10.25])


# -- CSV: regression ----------------------------------------------------------------------


def test_csv_float_column_is_regression(tmp_path):
    csv = csv_with_images(tmp_path, "file,age", ["1.5", "20", "3.25", "-4"])
    table = read_source(csv)
    assert table.task.kind == "regression"
    assert table.task.names == ["age"]
    assert table.targets.shape == (4, 1) and table.targets.dtype == np.float32
    np.testing.assert_allclose(table.targets[:, 0], [1.5, 20, 3.25, -4])


def test_csv_several_numeric_columns_are_multi_target_regression(tmp_path):
    csv = csv_with_images(tmp_path, "file,x,y", ["1,2", "3,4", "5,60"])
    table = read_source(csv)
    assert table.task.kind == "regression"
    assert table.task.names == ["x", "y"]
    np.testing.assert_allclose(table.targets, [[1, 2], [3, 4], [5, 60]])


def test_csv_task_forcing(tmp_path):
    csv = csv_with_images(tmp_path, "file,label", ["1", "2", "3"])
    assert read_source(csv).task.kind == "classification"
    table = read(csv, task="regression")
    assert table.task.kind == "regression"
    np.testing.assert_allclose(table.targets[:, 0], [1, 2, 3])
    table = read(csv, task="multilabel")
    assert table.task.kind == "multilabel" and table.task.names == ["1", "2", "3"]
    np.testing.assert_array_equal(table.targets, np.eye(3))
    csv = csv_with_images(tmp_path, "file,label", ["a;b", "b"], name="semi.csv")
    table = read(csv, task="classification")
    assert table.task.kind == "classification" and table.task.names == ["a;b", "b"]


def test_csv_regression_target_not_a_number_names_the_line(tmp_path):
    csv = csv_with_images(tmp_path, "file,age", ["1.5", "2.5", "old", "4"])
    with pytest.raises(ImagefitError, match="line 4") as info:
        read(csv, task="regression")
    message = str(info.value)
    assert "data.csv" in message and "'age'" in message and "'old'" in message
    assert "not a number" in message and "fix it or remove the row" in message


def test_csv_regression_target_empty_names_the_line(tmp_path):
    csv = csv_with_images(tmp_path, "file,age", ["1.5", "", "2.5"])
    with pytest.raises(ImagefitError, match="line 3") as info:
        read(csv, task="regression")
    message = str(info.value)
    assert "data.csv" in message and "'age'" in message
    assert "empty" in message and "fill it or remove the row" in message


def test_csv_regression_target_nan_is_a_clear_error(tmp_path):
    csv = csv_with_images(tmp_path, "file,age", ["1.5", "nan", "2.5"])
    with pytest.raises(ImagefitError, match="line 3") as info:
        read(csv, task="regression")
    assert "'age'" in str(info.value)


def test_csv_float_column_with_nan_is_not_taken_as_classes(tmp_path):
    csv = csv_with_images(tmp_path, "file,age", ["1.5", "nan", "2.5", "0.25"])
    with pytest.raises(ImagefitError, match="line 3"):
        read_source(csv)


def test_csv_empty_class_label_names_the_line(tmp_path):
    csv = csv_with_images(tmp_path, "file,label", ["cat", "dog", "", ""])
    with pytest.raises(ImagefitError, match="line 4") as info:
        read_source(csv)
    message = str(info.value)
    assert "data.csv" in message and "'label'" in message and "empty" in message
    assert "2 such rows" in message and "fill them or remove the rows" in message


def test_csv_empty_integer_class_label_names_the_line(tmp_path):
    csv = csv_with_images(tmp_path, "file,label", ["0", "1", "", "2"])
    with pytest.raises(ImagefitError, match="line 4") as info:
        read_source(csv)
    message = str(info.value)
    assert "empty" in message and "regression" not in message


# -- CSV: splits and structure errors -----------------------------------------------------


def test_csv_split_column(tmp_path):
    labels = ["cat,train", "dog,Train", "cat,val", "dog,validation", "cat,test", "dog,TEST"]
    csv = csv_with_images(tmp_path, "file,label,split", labels)
    table = read_source(csv)
    assert table.task.names == ["cat", "dog"]  # the split column is not a label
    assert table.split.tolist() == ["train", "train", "valid", "valid", "test", "test"]


def test_csv_split_col_option(tmp_path):
    csv = csv_with_images(tmp_path, "file,label,fold", ["cat,train", "dog,valid"])
    table = read(csv, split_col="fold", label_col=["label"])
    assert table.split.tolist() == ["train", "valid"]


def test_csv_bad_split_value_names_line_and_choices(tmp_path):
    csv = csv_with_images(tmp_path, "file,label,split", ["cat,train", "dog,holdout"])
    with pytest.raises(ImagefitError, match="line 3") as info:
        read_source(csv)
    message = str(info.value)
    assert "data.csv" in message and "'holdout'" in message and "'split'" in message
    assert "train, valid or test" in message


@pytest.mark.parametrize(
    ("option", "flag"),
    [({"label_col": ["species"]}, "--label-col"), ({"path_col": "image"}, "--path-col"),
     ({"split_col": "fold"}, "--split-col")],
)
def test_csv_missing_named_column_lists_columns(tmp_path, option, flag):
    csv = csv_with_images(tmp_path, "file,label", ["cat", "dog"])
    with pytest.raises(ImagefitError, match="has no column") as info:
        read(csv, **option)
    message = str(info.value)
    missing = next(iter(option.values()))
    missing = missing[0] if isinstance(missing, list) else missing
    assert f"'{missing}'" in message and "data.csv" in message
    assert "file, label" in message and flag in message


def test_csv_with_only_a_path_column_is_an_error(tmp_path):
    tiny_png(tmp_path / "a.png")
    csv = write_csv(tmp_path / "data.csv", "file", ["a.png"])
    with pytest.raises(ImagefitError, match="no label column") as info:
        read_source(csv)
    assert "'file'" in str(info.value) and "data.csv" in str(info.value)


def test_csv_without_rows_is_an_error(tmp_path):
    csv = write_csv(tmp_path / "data.csv", "file,label", [])
    with pytest.raises(ImagefitError, match="no rows") as info:
        read_source(csv)
    assert str(csv) in str(info.value)


def test_unreadable_csv_is_an_error(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_bytes(b"")
    with pytest.raises(ImagefitError, match="not a readable CSV") as info:
        read_source(csv)
    assert str(csv) in str(info.value)


def test_csv_missing_images_show_first_few_and_count(tmp_path):
    rows = []
    for i in range(10):
        if i in (2, 5, 8):
            rows.append(f"gone{i}.png,cat")
        else:
            tiny_png(tmp_path / f"im{i}.png")
            rows.append(f"im{i}.png,cat")
    csv = write_csv(tmp_path / "data.csv", "file,label", rows)
    with pytest.raises(ImagefitError, match="3 of 10") as info:
        read_source(csv)
    message = str(info.value)
    assert "data.csv" in message and str(tmp_path) in message
    for i in (2, 5, 8):
        assert f"gone{i}.png (line {i + 2})" in message
    assert "--folder" in message and "--suffix" in message


def test_csv_missing_images_show_at_most_three(tmp_path):
    csv = write_csv(tmp_path / "data.csv", "file,label", [f"gone{i},cat" for i in range(7)])
    with pytest.raises(ImagefitError, match="7 of 7") as info:
        read(csv, suffix=".jpg")
    message = str(info.value)
    assert "gone2.jpg" in message and "gone3.jpg" not in message


# -- validation splits --------------------------------------------------------------------


def test_class_with_single_image_when_stratifying(tmp_path):
    root = class_tree(tmp_path / "data", {"many": 6, "lonely": 1})
    table = read_source(root)
    with pytest.raises(ImagefitError, match="single training image") as info:
        assign_validation(table, 0.3, seed=0)
    message = str(info.value)
    assert "'lonely'" in message and "1 such classes" in message
    assert "add images" in message and "--no-stratify" in message
    unstratified = assign_validation(table, 0.3, seed=0, stratify=False)
    assert (unstratified.split == "valid").sum() == 2


def test_valid_pct_that_leaves_nothing_is_an_error(tmp_path):
    table = read_source(class_tree(tmp_path / "data", {"a": 2, "b": 2}))
    with pytest.raises(ImagefitError, match="--valid-pct 0.1") as info:
        assign_validation(table, 0.1, seed=0)
    assert "no validation" in str(info.value) and "0 for no validation" in str(info.value)


def test_validation_split_is_seeded_and_stratified(tmp_path):
    table = read_source(class_tree(tmp_path / "data", {"a": 20, "b": 10}))
    first = assign_validation(table, 0.2, seed=1)
    again = assign_validation(table, 0.2, seed=1)
    other = assign_validation(table, 0.2, seed=2)
    assert first.split.tolist() == again.split.tolist()
    assert first.split.tolist() != other.split.tolist()
    valid = first.targets[first.split == "valid"]
    assert np.bincount(valid).tolist() == [4, 2]
    assert assign_validation(table, 0, seed=0) is table


# -- arrays -------------------------------------------------------------------------------


def test_from_arrays_grey_nhw():
    images = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    table = from_arrays(images, [0, 2])
    assert table.arrays.shape == (2, 4, 5, 1)
    np.testing.assert_array_equal(table.arrays[..., 0], images)
    assert table.task.kind == "classification" and table.task.names == ["0", "1", "2"]
    assert table.targets.dtype == np.int64 and table.split.tolist() == ["train", "train"]


def test_from_arrays_nhwc_and_nchw_agree():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (3, 6, 7, 3), dtype=np.uint8)
    nchw = nhwc.transpose(0, 3, 1, 2).copy()
    a = from_arrays(nhwc, [0, 1, 0])
    b = from_arrays(nchw, [0, 1, 0])
    c = from_arrays(torch.from_numpy(nchw), torch.tensor([0, 1, 0]))
    assert a.arrays.shape == (3, 6, 7, 3)
    np.testing.assert_array_equal(a.arrays, nhwc)
    np.testing.assert_array_equal(b.arrays, nhwc)
    np.testing.assert_array_equal(c.arrays, nhwc)
    assert c.targets.tolist() == [0, 1, 0]


def test_from_arrays_single_channel_nchw_and_rgba():
    grey = np.zeros((2, 1, 5, 6), dtype=np.uint8)
    assert from_arrays(grey, [0, 1]).arrays.shape == (2, 5, 6, 1)
    rgba = np.zeros((2, 5, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 7
    out = from_arrays(rgba, [0, 1]).arrays
    assert out.shape == (2, 5, 6, 3) and (out[..., 0] == 7).all()


def test_from_arrays_float_zero_to_one_becomes_uint8():
    images = np.array([[[0.0, 0.5], [1.0, 0.2]]], dtype=np.float32)
    table = from_arrays(images, np.array([0.5]))
    assert table.arrays.dtype == np.uint8
    assert table.arrays[0, :, :, 0].tolist() == [[0, 128], [255, 51]]
    assert table.task.kind == "regression" and table.task.names == ["target_0"]
    assert table.targets.shape == (1, 1) and table.targets.dtype == np.float32


def test_from_arrays_tasks_names_and_splits():
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    table = from_arrays(images, [1, 0, 1], names=["no", "yes"], split=["train", "val", "test"])
    assert table.task.names == ["no", "yes"]
    assert table.split.tolist() == ["train", "valid", "test"]
    multi = from_arrays(images, np.eye(3, dtype=np.float32), task="multilabel")
    assert multi.task.kind == "multilabel" and multi.task.names == [f"label_{i}" for i in range(3)]
    regression = from_arrays(images, np.ones((3, 2)), task="regression", names=["x", "y"])
    assert regression.targets.shape == (3, 2) and regression.task.names == ["x", "y"]


def test_from_arrays_errors():
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    with pytest.raises(ImagefitError, match="3 images but 2 targets"):
        from_arrays(images, [0, 1])
    with pytest.raises(ImagefitError, match="only 2 names"):
        from_arrays(images, [0, 1, 2], names=["a", "b"])
    with pytest.raises(ImagefitError, match=r"split values \['holdout'\] unknown") as info:
        from_arrays(images, [0, 1, 0], split=["train", "holdout", "test"])
    assert "train, valid or test" in str(info.value)


def test_to_uint8_images_errors():
    with pytest.raises(ImagefitError, match=r"shape \(4, 4\)") as info:
        to_uint8_images(np.zeros((4, 4), dtype=np.uint8))
    assert "(N, H, W)" in str(info.value) and "(N, C, H, W)" in str(info.value)
    with pytest.raises(ImagefitError, match="5 channels") as info:
        to_uint8_images(np.zeros((2, 8, 8, 5), dtype=np.uint8))
    assert "1 (grey) or 3 (RGB)" in str(info.value)
    with pytest.raises(ImagefitError, match=r"\[0, 1\]") as info:
        to_uint8_images(np.full((2, 4, 4), 200.0))
    assert "uint8" in str(info.value)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    import imagefit.data.builtin as builtin

    monkeypatch.setattr(builtin, "SYSTEM_DATASETS", tmp_path / "none")
    monkeypatch.delenv("IMAGEFIT_DATA", raising=False)
    with pytest.raises(ImagefitError, match=r"builtin:fashion-mnist was not found and downloads "
                                            r"are off.*apt-get install dataset-fashion-mnist"
                                            r".*IMAGEFIT_DATA"):
        builtin.read_builtin("fashion-mnist")


def test_fashion_mnist_from_a_folder_named_by_imagefit_data(tmp_path, monkeypatch):
    import gzip

    import imagefit.data.builtin as builtin

    def idx(path, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as out:
            out.write(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    for stem, shape in (("train-images-idx3-ubyte", (60000, 28, 28)),
                        ("t10k-images-idx3-ubyte", (3, 28, 28))):
        idx(tmp_path / f"{stem}.gz", np.zeros(shape, dtype=np.uint8))
    idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 60000))
    idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    monkeypatch.setattr(builtin, "SYSTEM_DATASETS", tmp_path / "none")
    monkeypatch.setenv("IMAGEFIT_DATA", str(tmp_path))
    table = builtin.read_builtin("fashion-mnist")
    assert len(table) == 60003 and list(table.split[-3:]) == ["test"] * 3
    assert list(table.targets[-3:]) == [1, 2, 3] and table.task.names[0] == "T-shirt/top"


# -- hardening: separators, mixed layouts, silent switches, ranges, contradictions ---------


@pytest.mark.parametrize("separator", [";", "\t"])
def test_semicolon_and_tab_separated_csv_files_are_read(tmp_path, separator):
    for i in range(4):
        tiny_png(tmp_path / f"im{i}.png", i)
    rows = [f"im{i}.png{separator}{'cat' if i % 2 else 'dog'}" for i in range(4)]
    table = read(write_csv(tmp_path / "data.csv", f"file{separator}label", rows))
    assert table.task.kind == "classification" and table.task.names == ["cat", "dog"]
    assert table.targets.tolist() == [1, 0, 1, 0]


def test_folder_with_train_and_class_folders_is_an_error(tmp_path):
    class_tree(tmp_path / "train", {"a": 2, "b": 2})
    class_tree(tmp_path, {"c": 2})
    with pytest.raises(ImagefitError, match=r"holds train/ and also other folders \(c\), "
                       r"which would be ignored: move class folders into train/"):
        read_source(tmp_path)


def test_a_few_decimals_in_whole_numbers_say_regression_was_chosen(tmp_path):
    labels = [str(i % 3) for i in range(30)]
    labels[7] = "2.5"
    path = csv_with_images(tmp_path, "file,grade", labels)
    with pytest.warns(ImagefitWarning, match=r"column 'grade' holds whole numbers except "
                      r"'2.5' \(line 9\), so it is read as a regression target; if its values "
                      r"are classes, fix those rows \(or give --task classification\)"):
        table = read(path)
    assert table.task.kind == "regression"


def test_decimal_targets_do_not_warn(tmp_path, recwarn):
    path = csv_with_images(tmp_path, "file,age", [f"{20 + i * 0.5}" for i in range(10)])
    assert read(path).task.kind == "regression"
    assert not [w for w in recwarn if issubclass(w.category, ImagefitWarning)]


def test_space_separated_tags_are_read_as_multilabel_and_said_so(tmp_path):
    tags = ["clear primary", "clear water", "haze primary water", "clear", "primary water",
            "haze"] * 2
    path = csv_with_images(tmp_path, "image_name,tags", tags)
    with pytest.warns(ImagefitWarning, match=r"space-separated tags .* read as multi-label; "
                      r"give --task classification"):
        table = read(path)
    assert table.task.kind == "multilabel"
    assert table.task.names == ["clear", "haze", "primary", "water"]
    assert table.targets[2].tolist() == [0, 1, 1, 1]


def test_class_names_with_spaces_stay_classes(tmp_path, recwarn):
    names = ["golden retriever", "labrador retriever", "border collie"] * 3
    table = read(csv_with_images(tmp_path, "file,breed", names))
    assert table.task.kind == "classification"
    assert "golden retriever" in table.task.names
    assert not [w for w in recwarn if issubclass(w.category, ImagefitWarning)]


def test_targets_beyond_float32_are_refused_with_the_line(tmp_path):
    values = [f"{i * 1.5}" for i in range(6)]
    values[4] = "1e39"
    with pytest.raises(ImagefitError, match=r"data.csv line 6: regression target 'y' is 1e39, "
                       r"beyond the range of 32-bit floats .*: rescale the targets"):
        read(csv_with_images(tmp_path, "file,y", values))


def test_array_targets_beyond_float32_are_refused():
    images = np.zeros((3, 8, 8), dtype=np.uint8)
    with pytest.raises(ImagefitError, match=r"target 1 \(column 0\) is 1e\+39, beyond the range"):
        from_arrays(images, np.array([1.0, 1e39, 2.0]))
    with pytest.raises(ImagefitError, match="NaN or infinite"):
        from_arrays(images, np.array([1.0, np.nan, 2.0]))


def test_one_file_under_two_labels_is_an_error_naming_both_lines(tmp_path):
    path = csv_with_images(tmp_path, "file,label", ["cat", "dog", "cat"])
    path.write_text(path.read_text() + "im1.png,cat\n")
    with pytest.raises(ImagefitError, match=r"im1.png is listed with different labels on line 3 "
                       r"\('dog'\) and line 5 \('cat'\): give each file one label"):
        read(path)


def test_one_file_listed_twice_with_one_label_is_accepted(tmp_path):
    path = csv_with_images(tmp_path, "file,label", ["cat", "dog", "cat"])
    path.write_text(path.read_text() + "im1.png,dog\n")
    assert len(read(path)) == 4
