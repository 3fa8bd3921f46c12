"""Cross-validation folds (data/folds.py) and class-imbalance resampling (data/sampling.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from imagefit.config import SourceOptions
from imagefit.data.folds import (
    assign_folds,
    load_folds,
    read_groups,
    save_folds,
    split_for_fold,
)
from imagefit.data.sampling import class_weights, resample_rows, weighted_sampler_rows
from imagefit.data.sources import read_source
from imagefit.data.splits import assign_validation
from imagefit.data.table import Table
from imagefit.errors import ImagefitError
from imagefit.tasks import Task


def classification_table(counts=(50, 30, 13), n_test=10, seed=0) -> Table:
    """Classes 'cat', 'dog', 'fox' with ``counts`` labelled rows, shuffled, then test rows."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    labels = np.concatenate([labels, rng.integers(0, len(counts), n_test)])
    split = np.array(["train"] * (len(labels) - n_test) + ["test"] * n_test, dtype=object)
    return Table(
        task=Task("classification", ["cat", "dog", "fox"][:len(counts)]),
        targets=labels.astype(np.int64),
        split=split,
        paths=[f"/data/img_{i}.png" for i in range(len(labels))],
    )


def multilabel_table(n=240, seed=0) -> Table:
    """Five labels with frequencies 5% to 45%, drawn independently."""
    rng = np.random.default_rng(seed)
    frequencies = np.array([0.05, 0.15, 0.25, 0.35, 0.45])
    targets = (rng.random((n, 5)) < frequencies).astype(np.float32)
    return Table(task=Task("multilabel", list("abcde")), targets=targets,
                 split=np.full(n, "train", dtype=object))


def regression_table(n=100, seed=0) -> Table:
    rng = np.random.default_rng(seed)
    targets = rng.lognormal(size=(n, 1)).astype(np.float32)
    return Table(task=Task("regression", ["size"]), targets=targets,
                 split=np.full(n, "train", dtype=object))


# -- folds --------------------------------------------------------------------------------


def test_stratified_folds_keep_class_proportions():
    table = classification_table()
    folds = assign_folds(table, 5, seed=0)
    labelled = table.split != "test"
    for c, total in enumerate(np.bincount(table.targets[labelled])):
        for fold in range(5):
            in_fold = int(((folds == fold) & (table.targets == c)).sum())
            assert abs(in_fold - total / 5) < 1, (c, fold, in_fold, total)


def test_multilabel_folds_keep_label_frequencies():
    # Iterative stratification places the rows of the rarest label first, one row at a time;
    # a row carrying several labels can push a common label one past its even share, so the
    # tolerance is 2 positives (with 17 to 95 positives per label here it achieves 0.75).
    # Plain shuffled folds miss by 5 to 7 positives on this data.
    table = multilabel_table()
    folds = assign_folds(table, 4, seed=0)
    positives = table.targets.sum(axis=0)
    for fold in range(4):
        in_fold = table.targets[folds == fold].sum(axis=0)
        assert np.abs(in_fold - positives / 4).max() < 2, (fold, in_fold, positives / 4)


def test_regression_folds_spread_the_targets():
    table = regression_table()
    folds = assign_folds(table, 5, seed=0)
    top = table.targets[:, 0] >= np.quantile(table.targets[:, 0], 0.9)
    assert all(((folds == fold) & top).sum() == 2 for fold in range(5))


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_groups_never_cross_folds(kind):
    rng = np.random.default_rng(3)
    table = classification_table() if kind == "classification" else regression_table(n=103)
    groups = rng.integers(0, 20, len(table))
    folds = assign_folds(table, 4, seed=1, groups=groups)
    labelled = table.split != "test"
    for group in np.unique(groups):
        assert len(np.unique(folds[labelled & (groups == group)])) == 1
    sizes = np.bincount(folds[labelled], minlength=4)
    assert sizes.min() > 0


@pytest.mark.parametrize("make,method", [
    (classification_table, "kfold"),
    (classification_table, "stratified"),
    (classification_table, "group"),
    (multilabel_table, "multilabel"),
    (regression_table, "auto"),
])
def test_every_labelled_row_is_in_one_fold_and_test_rows_in_none(make, method):
    table = make()
    groups = np.arange(len(table)) % 17 if method == "group" else None
    folds = assign_folds(table, 3, seed=0, method=method, groups=groups)
    assert folds.shape == (len(table),)
    is_test = table.split == "test"
    assert (folds[is_test] == -1).all()
    assert sorted(np.unique(folds[~is_test])) == [0, 1, 2]


def test_a_source_validation_split_joins_the_folds():
    table = classification_table()
    table.split[:20] = "valid"
    folds = assign_folds(table, 3)
    assert (folds[:20] >= 0).all()
    fold_table = split_for_fold(table, folds, 1)
    assert list(fold_table.rows("valid")) == list(np.flatnonzero(folds == 1))
    assert list(fold_table.rows("test")) == list(table.rows("test"))
    assert (fold_table.split[(folds != 1) & (folds >= 0)] == "train").all()


@pytest.mark.parametrize("method", ["kfold", "stratified", "group"])
def test_folds_are_seeded(method):
    table = classification_table()
    groups = np.arange(len(table)) % 23
    first = assign_folds(table, 5, seed=7, method=method, groups=groups)
    assert np.array_equal(first, assign_folds(table, 5, seed=7, method=method, groups=groups))
    assert not np.array_equal(first, assign_folds(table, 5, seed=8, method=method,
                                                  groups=groups))


def test_group_column_is_read_from_the_csv(tmp_path, labelled_images):
    folder, names, kinds = labelled_images
    csv = tmp_path / "labels.csv"
    patients = [f"p{i // 6}" for i in range(len(names))]
    pd.DataFrame({"path": [f"images/{n}" for n in names], "label": kinds,
                  "patient": patients}).to_csv(csv, index=False)
    table = read_source(csv, SourceOptions(label_col=["label"]))
    groups = read_groups(csv, "patient", table)
    assert list(groups) == patients
    folds = assign_folds(table, 5, groups=groups)
    assert all(len(np.unique(folds[groups == p])) == 1 for p in set(patients))
    with pytest.raises(ImagefitError, match="no column 'site'.*--group-col"):
        read_groups(csv, "site", table)


def test_folds_file_round_trips(tmp_path):
    table = classification_table()
    folds = assign_folds(table, 4, seed=2)
    path = save_folds(tmp_path / "folds.csv", folds, table.paths)
    assert list(pd.read_csv(path).columns) == ["row", "path", "fold"]
    assert np.array_equal(load_folds(path, table), folds)
    without_paths = save_folds(tmp_path / "rows.csv", folds)
    assert np.array_equal(load_folds(without_paths, table), folds)


def test_mismatched_folds_file_is_an_error_naming_it(tmp_path):
    table = classification_table()
    path = save_folds(tmp_path / "folds.csv", assign_folds(table, 4), table.paths)
    with pytest.raises(ImagefitError, match=r"--folds-file folds.csv does not match the data: "
                                            r"it has 103 rows, the data 93"):
        load_folds(path, table.subset(np.arange(93)))
    other = Table(table.task, table.targets, table.split,
                  paths=[p.replace("img_5.", "other_5.") for p in table.paths])
    with pytest.raises(ImagefitError, match=r"folds.csv does not match the data: row 5 is "
                                            r"/data/img_5.png, the data has /data/other_5.png"):
        load_folds(path, other)
    moved_test = Table(table.task, table.targets, np.roll(table.split, 1), paths=table.paths)
    with pytest.raises(ImagefitError, match="folds.csv does not match the data: row 0 has fold"):
        load_folds(path, moved_test)
    with pytest.raises(ImagefitError, match="--folds-file .*missing.csv not found"):
        load_folds(tmp_path / "missing.csv", table)


def test_fold_errors_say_what_to_do():
    table = classification_table(counts=(50, 30, 3))
    with pytest.raises(ImagefitError, match="--folds 1 is too few: cross-validation needs at "
                                            "least 2 folds"):
        assign_folds(table, 1)
    with pytest.raises(ImagefitError, match="--folds 4 is more than the 3 images of class 'fox'"
                                            ".*choose at most 3 folds"):
        assign_folds(table, 4)
    assert assign_folds(table, 4, method="kfold").max() == 3
    with pytest.raises(ImagefitError, match="--folds 6 is more than the 5 groups"):
        assign_folds(table, 6, groups=np.arange(len(table)) % 5)
    with pytest.raises(ImagefitError, match="--fold-method group needs groups: .*--group-col"):
        assign_folds(table, 3, method="group")
    with pytest.raises(ImagefitError, match="--fold-method split is unknown: choose one of auto"):
        assign_folds(table, 3, method="split")
    with pytest.raises(ImagefitError, match="--fold-method multilabel needs multi-label"):
        assign_folds(table, 3, method="multilabel")
    with pytest.raises(ImagefitError, match="2 group values for 93 images: give one "
                                            "group per image"):
        assign_folds(table, 3, groups=["a", "b"])


# -- resampling ---------------------------------------------------------------------------


def test_oversampling_triples_the_minority_in_training_rows_only():
    table = assign_validation(classification_table(), valid_pct=0.2, seed=0)
    train_rows, valid_rows = table.rows("train"), table.rows("valid")
    rows = resample_rows(train_rows, table.targets, table.task, oversample={"fox": 3}, seed=0)
    repeats = np.bincount(rows, minlength=len(table))
    is_fox = table.targets == 2
    assert (repeats[train_rows[is_fox[train_rows]]] == 3).all()
    assert (repeats[train_rows[~is_fox[train_rows]]] == 1).all()
    assert (repeats[valid_rows] == 0).all()
    assert (is_fox[rows]).sum() == 3 * is_fox[train_rows].sum()


def test_fractional_oversampling_adds_a_seeded_random_part():
    table = classification_table(n_test=0)
    train_rows = table.rows("train")
    rows = resample_rows(train_rows, table.targets, table.task, oversample={"fox": 2.5}, seed=1)
    fox_repeats = np.bincount(rows, minlength=len(table))[table.targets == 2]
    assert fox_repeats.sum() == round(2.5 * 13)
    assert set(fox_repeats) == {2, 3}
    again = resample_rows(train_rows, table.targets, table.task, oversample={"fox": 2.5}, seed=1)
    assert np.array_equal(rows, again)


def test_multilabel_oversampling_repeats_rows_having_the_label():
    table = multilabel_table()
    train_rows = table.rows("train")
    rows = resample_rows(train_rows, table.targets, table.task, oversample={"a": 4})
    repeats = np.bincount(rows, minlength=len(table))
    has_a = table.targets[:, 0] == 1
    assert (repeats[has_a] == 4).all() and (repeats[~has_a] == 1).all()


@pytest.mark.parametrize("balance,expected", [("over", 40), ("under", 10)])
def test_balance_gives_equal_class_counts(balance, expected):
    table = classification_table(counts=(40, 25, 10), n_test=0)
    rows = resample_rows(table.rows("train"), table.targets, table.task, balance=balance, seed=0)
    assert list(np.bincount(table.targets[rows])) == [expected] * 3
    if balance == "under":
        assert len(np.unique(rows)) == len(rows)


def test_class_weights_by_hand():
    weights = class_weights(np.array([0, 0, 0, 1]), Task("classification", ["a", "b", "c"]))
    # inverse frequencies 1/3 and 1, mean 2/3 over the classes present; class 2 is absent
    assert torch.allclose(weights, torch.tensor([0.5, 1.5, 0.0]))
    multilabel = np.array([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0]],
                          dtype=np.float32)
    # negatives / positives: 3/1, 2/2; label 'c' is always on and 'd' never, so both 1
    assert torch.allclose(class_weights(multilabel, Task("multilabel", list("abcd"))),
                          torch.tensor([3.0, 1.0, 1.0, 1.0]))


def test_weighted_sampler_draws_classes_about_equally():
    table = classification_table(counts=(90, 9, 1), n_test=0)
    train_rows = table.rows("train")
    rows = weighted_sampler_rows(train_rows, table.targets, table.task, n=30_000,
                                 seed=0, epoch=0)
    frequencies = np.bincount(table.targets[rows], minlength=3) / len(rows)
    # each class has probability 1/3; 3 standard deviations of 30,000 draws is 0.008
    assert np.abs(frequencies - 1 / 3).max() < 0.01
    assert len(weighted_sampler_rows(train_rows, table.targets, table.task)) == 100
    same = weighted_sampler_rows(train_rows, table.targets, table.task, seed=0, epoch=3)
    assert np.array_equal(same, weighted_sampler_rows(train_rows, table.targets,
                                                      table.task, seed=0, epoch=3))
    assert not np.array_equal(same, weighted_sampler_rows(train_rows, table.targets,
                                                          table.task, seed=0, epoch=4))


def test_resampling_errors_say_what_to_do():
    table = classification_table()
    rows = table.rows("train")
    with pytest.raises(ImagefitError, match="--oversample class 'wolf' is not a class of the "
                                            "data: choose from cat, dog, fox"):
        resample_rows(rows, table.targets, table.task, oversample={"wolf": 2})
    with pytest.raises(ImagefitError, match="--oversample fox=0: the factor must be above 0"):
        resample_rows(rows, table.targets, table.task, oversample={"fox": 0})
    with pytest.raises(ImagefitError, match="--oversample and --balance both resample"):
        resample_rows(rows, table.targets, table.task, oversample={"fox": 2}, balance="over")
    with pytest.raises(ImagefitError, match="--balance sideways is unknown"):
        resample_rows(rows, table.targets, table.task, balance="sideways")
    regression = regression_table()
    with pytest.raises(ImagefitError, match="--balance needs classes, and regression targets "
                                            "have none"):
        resample_rows(regression.rows("train"), regression.targets, regression.task,
                      balance="over")
    with pytest.raises(ImagefitError, match="class weights needs classes"):
        class_weights(regression.targets, regression.task)
    with pytest.raises(ImagefitError, match="--weighted-sampler needs classes"):
        weighted_sampler_rows(regression.rows("train"), regression.targets,
                              regression.task)
    multilabel = multilabel_table()
    with pytest.raises(ImagefitError, match="--balance needs single-label classes.*"
                                            "--oversample LABEL=FACTOR"):
        resample_rows(multilabel.rows("train"), multilabel.targets, multilabel.task,
                      balance="under")
