"""Class imbalance in a fit: resampled training rows, weighted loss and a per-epoch weighted
draw; validation and test rows are never touched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import imagefit
from imagefit import cli
from imagefit.config import FitConfig, make_options
from imagefit.data.table import Table, from_arrays
from imagefit.errors import ImagefitError
from imagefit.tasks import Task
from imagefit.train.callbacks.base import Callback
from imagefit.workflows.build import build_training
from imagefit.workflows.loading import load_data

NAMES = ["healthy", "rust", "multiple_diseases"]


def imbalanced_table() -> Table:
    """90 images: 50 healthy, 30 rust, 10 multiple_diseases."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [50, 30, 10])
    images = rng.integers(0, 50, (len(labels), 12, 12), dtype=np.uint8)
    images[labels == 1, 3:9, :] = 200
    images[labels == 2, :, 3:9] = 200
    return from_arrays(images, labels, names=NAMES)


def build(table: Table, **options):
    cfg = make_options(FitConfig, {"progress": False, "valid_pct": 0.2, **options})
    loaded = load_data(table, cfg)
    return loaded, build_training(cfg, loaded, torch.device("cpu"))


def class_counts(table: Table, rows) -> np.ndarray:
    return np.bincount(table.targets[np.asarray(rows)], minlength=len(NAMES))


class LoaderRows(Callback):
    """Records the rows of the learner's training and validation loaders."""

    def before_fit(self, learner) -> None:
        self.train = learner.train_loader.rows.numpy().copy()
        self.valid = learner.valid_loader.rows.numpy().copy()


def test_fit_oversamples_the_training_loader_only(tmp_path):
    table = imbalanced_table()
    plain, oversampled = LoaderRows(), LoaderRows()
    options = {"epochs": 1, "progress": False, "runs_dir": str(tmp_path), "report": False,
               "tta": False}
    imagefit.fit(table, callbacks=[plain], **options)
    result = imagefit.fit(table, callbacks=[oversampled], oversample="multiple_diseases=3",
                          **options)
    before, after = class_counts(table, plain.train), class_counts(table, oversampled.train)
    assert after[2] == 3 * before[2] and (after[:2] == before[:2]).all()
    assert np.array_equal(np.unique(oversampled.train), plain.train)
    assert np.array_equal(oversampled.valid, plain.valid)
    assert result.metrics["n_train"] == len(plain.train)


def test_balance_gives_equal_class_counts_in_the_training_loader():
    table = imbalanced_table()
    for balance in ("over", "under"):
        loaded, parts = build(table, balance=balance)
        counts = class_counts(table, parts.loaders["train"].rows)
        assert len(set(counts)) == 1
        expected = class_counts(table, loaded.train_rows)
        assert counts[0] == (expected.max() if balance == "over" else expected.min())
        assert parts.n_train_sampled == len(parts.loaders["train"].rows)
        assert np.array_equal(parts.loaders["valid"].rows.numpy(), loaded.valid_rows)
    _, plain = build(table)
    assert plain.n_train_sampled is None


def test_class_weights_weigh_the_training_loss_by_hand():
    weights = [0.5, 1.0, 2.0]
    task = Task("classification", ["a", "b", "c"], class_weights=weights)
    outputs = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]])
    targets = torch.tensor([0, 1, 2])
    expected = F.cross_entropy(outputs, targets, weight=torch.tensor(weights))
    log_probs = outputs.log_softmax(dim=1)[torch.arange(3), targets]
    by_hand = -(torch.tensor(weights) * log_probs).sum() / sum(weights)
    assert task.loss(outputs, targets, weighted=True).item() == pytest.approx(expected.item())
    assert expected.item() == pytest.approx(by_hand.item())
    assert task.loss(outputs, targets).item() == pytest.approx(
        F.cross_entropy(outputs, targets).item())

    multilabel = Task("multilabel", ["x", "y"], class_weights=[3.0, 1.0])
    logits, labels = torch.tensor([[0.5, -0.5]]), torch.tensor([[1.0, 1.0]])
    expected = (3 * F.softplus(-logits[0, 0]) + F.softplus(-logits[0, 1])) / 2
    assert multilabel.loss(logits, labels, weighted=True).item() == pytest.approx(
        expected.item())


def test_class_weights_come_from_the_training_targets_into_model_json(tmp_path):
    table = imbalanced_table()
    loaded, parts = build(table, class_weights=True)
    counts = class_counts(table, loaded.train_rows)
    inverse = 1 / counts
    assert parts.task.class_weights == pytest.approx(list(inverse / inverse.mean()))
    assert parts.model_info["task"]["class_weights"] == parts.task.class_weights
    _, plain = build(table)
    assert plain.task.class_weights == []

    result = imagefit.fit(table, epochs=1, progress=False, runs_dir=str(tmp_path), report=False,
                          tta=False, class_weights=True)
    stored = json.loads((result.run_dir / "model.json").read_text())["task"]
    assert stored["class_weights"] == pytest.approx(parts.task.class_weights)


def test_weighted_sampler_draws_classes_evenly_and_anew_each_epoch():
    table = imbalanced_table()
    loaded, parts = build(table, weighted_sampler=True)
    train = parts.loaders["train"]

    def epoch_rows(loader, epoch: int) -> np.ndarray:
        loader.set_epoch(epoch)
        return torch.cat(loader._index_batches()).numpy()

    rows = epoch_rows(train, 0)
    assert len(rows) == len(train) * train.batch_size
    assert set(rows) <= set(loaded.train_rows)
    frequencies = np.mean([class_counts(table, epoch_rows(train, e)) for e in range(30)], axis=0)
    assert np.allclose(frequencies / frequencies.sum(), 1 / 3, atol=0.04)
    assert not np.array_equal(epoch_rows(train, 1), epoch_rows(train, 2))
    _, again = build(table, weighted_sampler=True)
    assert np.array_equal(epoch_rows(again.loaders["train"], 1), epoch_rows(train, 1))
    assert np.array_equal(parts.loaders["valid"].rows.numpy(), loaded.valid_rows)


def test_conflicting_and_bad_options_are_refused():
    with pytest.raises(ImagefitError, match="--oversample and --weighted-sampler both resample"):
        make_options(FitConfig, {"oversample": {"rust": 2}, "weighted_sampler": True})
    with pytest.raises(ImagefitError, match="--balance and --weighted-sampler both resample"):
        make_options(FitConfig, {"balance": "under", "weighted_sampler": True})
    with pytest.raises(ImagefitError, match="--oversample and --balance both resample"):
        make_options(FitConfig, {"oversample": "rust=2", "balance": "over"})
    with pytest.raises(ImagefitError, match="option --oversample: .*pairs, comma-separated"):
        make_options(FitConfig, {"oversample": "rust"})
    with pytest.raises(ImagefitError, match="'mildew' is not a class of the data"):
        build(imbalanced_table(), oversample={"mildew": 2})
    regression = from_arrays(np.zeros((20, 8, 8), dtype=np.uint8), np.linspace(0, 1, 20))
    with pytest.raises(ImagefitError, match="--weighted-sampler needs classes"):
        build(regression, weighted_sampler=True)
    with pytest.raises(ImagefitError, match="class weights needs classes"):
        build(regression, class_weights=True)


def test_oversample_flag_forms():
    assert make_options(FitConfig, {"oversample": "multiple_diseases=3,rust=2"}).oversample == {
        "multiple_diseases": 3.0, "rust": 2.0}
    parser = cli.build_parser()
    for text in ("{multiple_diseases: 3}", "multiple_diseases=3"):
        args = parser.parse_args(["fit", "data", "--oversample", text])
        cfg = cli.resolve_options(FitConfig, args, ("data",))
        assert cfg.oversample == {"multiple_diseases": 3.0}


def test_an_old_task_dict_without_class_weights_still_loads():
    old = {"kind": "classification", "names": ["a", "b"], "regression_loss": "mse",
           "threshold": 0.5, "label_smoothing": 0.1, "target_mean": [], "target_std": [],
           "metrics": []}
    task = Task.from_dict(old)
    assert task.class_weights == []
    assert task.loss(torch.zeros(1, 2), torch.tensor([0]), weighted=True).item() == \
        pytest.approx(np.log(2))
    weighted = Task("classification", ["a", "b"], class_weights=[0.5, 1.5])
    assert Task.from_dict(weighted.to_dict()) == weighted


class EpochRows(Callback):
    """Records the rows each training epoch drew, in batches."""

    def before_epoch(self, learner) -> None:
        self.epochs = getattr(self, "epochs", []) + [[]]

    def after_batch(self, learner) -> None:
        if learner.model.training:
            self.epochs[-1].append(learner.train_loader.batch_rows.numpy().copy())


def test_a_weighted_sampler_fit_draws_new_rows_each_epoch(tmp_path):
    table = imbalanced_table()
    recorder = EpochRows()
    result = imagefit.fit(table, epochs=2, progress=False, runs_dir=str(tmp_path), report=False,
                          tta=False, weighted_sampler=True, callbacks=[recorder])
    first, second = (np.sort(np.concatenate(rows)) for rows in recorder.epochs)
    assert len(first) == len(second) == result.metrics["n_train"]
    assert len(np.unique(first)) < len(first)
    assert not np.array_equal(first, second)
