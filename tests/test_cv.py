"""Cross-validation, out-of-fold predictions, ensembles, soft labels, Kaggle formats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits

from conftest import isolated, write_image
from imagefit import api, cli
from imagefit.data.soft import soft_targets
from imagefit.data.table import from_arrays
from imagefit.errors import ImagefitError
from imagefit.evaluation import inference
from imagefit.tasks import Task
from imagefit.workflows.cv import cv


@pytest.fixture(scope="module")
def digits_cv(tmp_path_factory):
    """3 folds of digits, 1 epoch each, and a final model on everything."""
    root = tmp_path_factory.mktemp("cv")
    with isolated(root):
        return cv("builtin:digits", folds=3, epochs=1, progress=False,
                  runs_dir=str(root / "runs"), tta=False, train_on_all=True)


@pytest.fixture
def digit_pngs(tmp_path):
    digits = load_digits()
    for i in range(8):
        write_image(tmp_path / "pngs" / f"digit_{i}.png",
                    (digits.images[i] * 16).astype(np.uint8))
    return tmp_path / "pngs"


def test_oof_predictions_cover_every_training_row_exactly_once(digits_cv):
    oof = pd.read_csv(digits_cv.cv_dir / "oof.csv")
    assert sorted(oof["row"]) == list(range(1797))  # digits: every row trains (no test)
    folds = pd.read_csv(digits_cv.cv_dir / "folds.csv")
    assert (oof.set_index("row")["fold"] == folds.set_index("row")["fold"]).all()
    probabilities = oof.filter(like="prob_").to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    # each fold's rows were predicted by the model that did not train on them
    assert digits_cv.summary["oof"]["accuracy"] > 0.8


def test_cv_writes_per_fold_metrics_mean_std_and_report(digits_cv):
    frame = pd.read_csv(digits_cv.cv_dir / "cv_metrics.csv")
    assert list(frame["fold"]) == [0, 1, 2]
    summary = json.loads((digits_cv.cv_dir / "cv.json").read_text())
    assert summary["mean"]["valid_accuracy"] == pytest.approx(frame["valid_accuracy"].mean())
    assert summary["std"]["valid_accuracy"] == pytest.approx(frame["valid_accuracy"].std())
    page = (digits_cv.cv_dir / "report.html").read_text()
    assert "fold_0/report.html" in page and "Out-of-fold interpretation" in page
    for fold in range(3):
        assert (digits_cv.cv_dir / f"fold_{fold}" / "model.safetensors").is_file()


def test_train_on_all_uses_every_training_row(digits_cv):
    metrics = json.loads((digits_cv.all_run / "metrics.json").read_text())
    assert metrics["n_train"] == 1797 and metrics["n_valid"] == 0
    assert metrics["epochs"] == digits_cv.summary["epochs_for_all"] == 1


def test_cv_command_prints_folds_and_mean_std(tmp_path, capsys):
    assert cli.main(["cv", "builtin:digits", "--folds", "2", "--epochs", "1",
                     "--runs-dir", str(tmp_path), "--no-progress", "--no-tta",
                     "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "valid_accuracy per fold:" in out
    line = next(text for text in out.splitlines() if "valid_accuracy mean" in text)
    assert "+-" in line and "(std over 2 folds)" in line


def test_folds_file_reproduces_the_folds(digits_cv, tmp_path):
    again = cv("builtin:digits", folds=3, epochs=1, progress=False, runs_dir=str(tmp_path),
               tta=False, report=False, seed=5,
               folds_file=str(digits_cv.cv_dir / "folds.csv"))
    first = pd.read_csv(digits_cv.cv_dir / "folds.csv")
    second = pd.read_csv(again.cv_dir / "folds.csv")
    assert (first["fold"] == second["fold"]).all()
    with pytest.raises(ImagefitError, match="holds 3 folds but --folds is 4: give --folds 3"):
        cv("builtin:digits", folds=4, epochs=1, progress=False, runs_dir=str(tmp_path),
           folds_file=str(digits_cv.cv_dir / "folds.csv"))


def test_ensemble_of_identical_models_equals_the_single_model(digits_cv, tmp_path,
                                                              digit_pngs):
    single = digits_cv.cv_dir / "fold_0"
    twins = tmp_path / "twins"
    for name in ("fold_0", "fold_1"):
        shutil.copytree(single, twins / name)
    (twins / "cv.json").write_text(json.dumps({"runs": ["fold_0", "fold_1"]}))
    alone = inference.predict(single, [digit_pngs], progress=False)
    together = inference.predict(twins, [digit_pngs], progress=False)
    assert np.allclose(alone.filter(like="prob_"), together.filter(like="prob_"), atol=1e-6)


def test_cv_directory_predicts_with_the_fold_average_in_kaggle_formats(digits_cv,
                                                                       digit_pngs):
    members = inference.load_models(digits_cv.cv_dir)
    assert len(members) == 3
    each = [inference.predict(folder, [digit_pngs], progress=False).filter(like="prob_")
            for folder, _ in members]
    frame = inference.predict(digits_cv.cv_dir, [digit_pngs], progress=False,
                              format="kaggle", id_col="image_id")
    assert list(frame.columns) == ["image_id", *[str(i) for i in range(10)]]
    assert frame["image_id"].tolist() == [f"digit_{i}" for i in range(8)]
    assert np.allclose(frame.iloc[:, 1:].to_numpy(), sum(f.to_numpy() for f in each) / 3,
                       atol=1e-5)
    labels = inference.predict(digits_cv.cv_dir, [digit_pngs], progress=False,
                               format="kaggle-label")
    assert list(labels.columns) == ["id", "label"]
    averaged = sum(f.to_numpy() for f in each) / 3
    assert labels["label"].tolist() == [str(i) for i in averaged.argmax(1)]  # the average's
    assert labels["id"].tolist() == frame["image_id"].tolist()


def test_snapshot_ensemble_predicts_with_the_cycle_models(tmp_path, digit_pngs):
    run = api.fit("builtin:digits", schedule="sgdr", sgdr_cycles=2, cycle_len=1,
                  snapshots=True, progress=False, runs_dir=str(tmp_path), report=False,
                  tta=False).run_dir
    members = inference.load_models(run, snapshots=True)
    assert [folder.name for folder, _ in members] == ["snapshot_1", "snapshot_2"]
    frame = inference.predict(run, [digit_pngs], progress=False, snapshots=True)
    each = [inference.predict(folder, [digit_pngs], progress=False).filter(like="prob_")
            for folder, _ in members]
    assert np.allclose(frame.filter(like="prob_").to_numpy(),
                       (each[0].to_numpy() + each[1].to_numpy()) / 2, atol=1e-5)
    assert not np.allclose(each[0].to_numpy(), each[1].to_numpy(), atol=1e-3)
    plain = api.fit("builtin:digits", epochs=1, progress=False, runs_dir=str(tmp_path),
                    report=False, tta=False).run_dir
    with pytest.raises(ImagefitError, match="has no snapshot models .* --snapshots"):
        inference.load_models(plain, snapshots=True)


def test_soft_targets_blend_given_labels_with_oof_probabilities(tmp_path):
    table = from_arrays(np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 0]),
                        names=["a", "b", "c"])
    task = Task("classification", ["a", "b", "c"])
    oof = pd.DataFrame({"row": [0, 1, 2, 3], "fold": [0, 0, 1, 1],
                        "prob_a": [0.2, 0.1, 0.0, 1.0], "prob_b": [0.8, 0.9, 0.5, 0.0],
                        "prob_c": [0.0, 0.0, 0.5, 0.0]})
    oof.to_csv(tmp_path / "oof.csv", index=False)
    soft = soft_targets(tmp_path, 0.25, table, task, np.array([0, 1, 2]))
    assert torch.allclose(soft[0], torch.tensor([0.25 + 0.75 * 0.2, 0.75 * 0.8, 0.0]))
    assert torch.allclose(soft[2], torch.tensor([0.0, 0.375, 0.25 + 0.375]))
    assert torch.allclose(soft[3], torch.tensor([1.0, 0.0, 0.0]))  # not training: as given
    assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    oof.iloc[:2].to_csv(tmp_path / "oof.csv", index=False)
    with pytest.raises(ImagefitError, match="no prediction for training row 2"):
        soft_targets(tmp_path, 0.25, table, task, np.array([0, 1, 2]))
    with pytest.raises(ImagefitError, match="no oof.csv there"):
        soft_targets(tmp_path / "elsewhere", 0.5, table, task, np.array([0]))
    with pytest.raises(ImagefitError, match="needs classification or multi-label"):
        soft_targets(tmp_path, 0.5, table, Task("regression", ["v"]), np.array([0]))


class FirstBatch:
    """The training rows and the targets of the first batch's loss."""

    def after_loss(self, learner) -> None:
        if not hasattr(self, "targets"):
            self.rows = learner.train_loader.batch_rows.clone()
            self.targets = learner.y.detach().clone()


def test_fit_trains_on_soft_labels_from_a_cv_directory(digits_cv, tmp_path):
    first = FirstBatch()
    result = api.fit("builtin:digits", epochs=1, progress=False, runs_dir=str(tmp_path),
                     report=False, tta=False, soft_labels=str(digits_cv.cv_dir),
                     soft_alpha=0.5, callbacks=[first])
    assert result.metrics["valid_accuracy"] > 0.8
    # the loss saw half the one-hot label and half the out-of-fold probabilities (oof.csv's
    # 6 decimals), not the labels alone
    oof = pd.read_csv(digits_cv.cv_dir / "oof.csv").set_index("row")
    rows = first.rows.numpy()
    predicted = oof.loc[rows, [f"prob_{k}" for k in range(10)]].to_numpy(np.float32)
    hard = np.eye(10, dtype=np.float32)[load_digits().target[rows]]
    assert first.targets.shape == (len(rows), 10)
    np.testing.assert_allclose(first.targets.numpy(), 0.5 * hard + 0.5 * predicted, atol=1e-6)
    assert not np.allclose(first.targets.numpy(), hard, atol=0.01)
    with pytest.raises(ImagefitError, match="--soft-labels and --plc both change"):
        api.fit("builtin:digits", epochs=1, progress=False, runs_dir=str(tmp_path),
                soft_labels=str(digits_cv.cv_dir), plc=True)


def test_soft_labels_written_for_other_data_or_classes_are_refused(tmp_path):
    table = from_arrays(np.zeros((3, 8, 8), np.uint8), np.array([0, 1, 0]), names=["a", "b"])
    task = Task("classification", ["a", "b"])
    pd.DataFrame({"row": [0, 1, 7], "prob_a": [0.5] * 3, "prob_b": [0.5] * 3}).to_csv(
        tmp_path / "oof.csv", index=False)
    with pytest.raises(ImagefitError, match="has row 7 but the data has 3 rows: it was "
                                            "written for other data"):
        soft_targets(tmp_path, 0.5, table, task, np.array([0, 1]))
    pd.DataFrame({"row": [0, 1, 2], "prob_a": [0.5] * 3}).to_csv(tmp_path / "oof.csv",
                                                                 index=False)
    with pytest.raises(ImagefitError, match="has no column prob_b: it was not written for "
                                            r"these classes \(a, b\)"):
        soft_targets(tmp_path, 0.5, table, task, np.array([0, 1]))


def test_group_col_needs_a_csv(tmp_path):
    with pytest.raises(ImagefitError, match="--group-col reads a column of the CSV file: "
                                            "give a CSV as DATA"):
        cv("builtin:digits", folds=2, group_col="patient", runs_dir=str(tmp_path),
           progress=False)


def test_an_ensemble_of_different_setups_is_refused(digits_cv, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(digits_cv.cv_dir / "fold_0", mixed / "fold_0")
    shutil.copytree(digits_cv.cv_dir / "fold_1", mixed / "fold_1")
    info = json.loads((mixed / "fold_1" / "model.json").read_text())
    info["image_size"] = 16
    (mixed / "fold_1" / "model.json").write_text(json.dumps(info))
    (mixed / "cv.json").write_text(json.dumps({"runs": ["fold_0", "fold_1"]}))
    with pytest.raises(ImagefitError, match="sees images or classes differently from .*: an "
                                            "ensemble needs models of one fit setup"):
        inference.load_models(mixed)


def test_ensemble_tta_is_each_members_own_tta_averaged(tmp_path, digit_pngs):
    """predict --tta with real (random) augmentation: each member of a CV directory averages
    its own versions, made with the augmentation it trained with (--tta-augment auto), and
    the ensemble averages those."""
    runs = {}
    for name, augment in (("plain", "none"), ("flipped", "side_on")):
        runs[name] = api.fit("builtin:digits", epochs=1, augment=augment, progress=False,
                             runs_dir=str(tmp_path / name), report=False, tta=False).run_dir
    ensemble = tmp_path / "ensemble"
    for index, run in enumerate(runs.values()):
        shutil.copytree(run, ensemble / f"fold_{index}")
    (ensemble / "cv.json").write_text(json.dumps({"runs": ["fold_0", "fold_1"]}))

    def probabilities(run, **options):
        frame = inference.predict(run, [digit_pngs], progress=False, **options)
        return frame.filter(like="prob_").to_numpy()

    own = [probabilities(run, tta=True) for run in runs.values()]
    plain = [probabilities(run) for run in runs.values()]
    assert not np.allclose(own[0], plain[0], atol=1e-4)  # the versions were averaged in
    assert not np.allclose(own[1], plain[1], atol=1e-4)
    assert np.allclose(probabilities(ensemble, tta=True), (own[0] + own[1]) / 2, atol=1e-5)
    flipped_with_lights = probabilities(runs["flipped"], tta=True, tta_augment="light")
    assert not np.allclose(flipped_with_lights, own[1], atol=1e-4)  # its own, not light's
