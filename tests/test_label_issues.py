"""Label issues: planted flips are found by a CV and cleanlab, the CSV and the CV report show
them, and the next fit drops or relabels training rows only."""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import imagefit
from conftest import isolated
from imagefit.config import LabelIssuesOptions
from imagefit.errors import ImagefitError

CV = {"folds": 5, "epochs": 4, "progress": False, "report": False, "tta": False}


def flipped_digits(share: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits with ``share`` of the labels moved to another class (seeded):
    images, noisy labels, and the rows flipped."""
    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.copy()
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(labels), int(share * len(labels)), replace=False))
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, len(flipped))) % 10
    return images, labels, flipped


@pytest.fixture(scope="module")
def noisy_cv(tmp_path_factory):
    root = tmp_path_factory.mktemp("noisy")
    images, labels, flipped = flipped_digits(0.05, seed=0)
    table = imagefit.from_arrays(images, labels, description="noisy digits")
    with isolated(root / "cache"):
        result = imagefit.cv(table, runs_dir=str(root / "runs"), **CV)
    return result, flipped


def test_planted_flips_on_digits_are_found_with_precision_and_recall_above_06(noisy_cv):
    result, flipped = noisy_cv
    found = imagefit.label_issues(result.cv_dir, data_issues=False, progress=False)
    flagged = set(found.issues.frame["row"])
    hits = len(flagged & set(flipped.tolist()))
    precision, recall = hits / len(flagged), hits / len(flipped)
    assert precision > 0.6 and recall > 0.6, (precision, recall, len(flagged))
    frame = pd.read_csv(result.cv_dir / "label_issues.csv")
    assert list(frame.columns) == ["rank", "row", "fold", "path", "given", "suggested", "score"]
    assert list(frame["rank"]) == list(range(1, len(frame) + 1))
    # the score is 1 - the out-of-fold probability of the given label (self-confidence, from
    # oof.csv's 6 decimals), the suggestion the most probable class, and rank 1 the most suspect
    oof = pd.read_csv(result.cv_dir / "oof.csv", dtype={"label": str}).set_index("row")
    probabilities = oof.loc[frame["row"], [f"prob_{k}" for k in range(10)]].to_numpy()
    given = probabilities[np.arange(len(frame)), frame["given"].astype(int).to_numpy()]
    np.testing.assert_allclose(frame["score"], 1 - given, rtol=0, atol=1.5e-6)
    assert (frame["suggested"].astype(int) == probabilities.argmax(axis=1)).all()
    assert list(frame["row"]) == list(frame.sort_values("score", ascending=False,
                                                        kind="stable")["row"])
    assert (frame["given"].astype(str) != frame["suggested"].astype(str)).mean() > 0.9
    summary = json.loads((result.cv_dir / "label_issues.json").read_text())
    assert summary["flagged"] == len(frame) and summary["rows"] == 1797
    assert summary["pairs"] and all(p["given"] != p["true"] for p in summary["pairs"])
    page = (result.cv_dir / "report.html").read_text()
    assert '<section id="label-issues">' in page
    assert f"{len(frame)} of 1797 training images" in page


def test_a_clean_dataset_flags_few(tmp_path):
    images, labels, _ = flipped_digits(0.0, seed=0)
    result = imagefit.cv(imagefit.from_arrays(images, labels), runs_dir=str(tmp_path), **CV)
    found = imagefit.label_issues(result.cv_dir, data_issues=False, progress=False)
    assert len(found.issues.frame) < 0.02 * 1797  # under 36: the model's own errors


def test_multilabel_planted_drops_are_found(tmp_path):
    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    tags = np.stack([digits.target % 2 == 0, digits.target >= 5,
                     np.isin(digits.target, [0, 6, 8, 9])], axis=1).astype(np.float32)
    rng = np.random.default_rng(1)
    holders = np.flatnonzero(tags[:, 0] == 1)
    dropped = np.sort(rng.choice(holders, 40, replace=False))
    tags[dropped, 0] = 0  # 'even' left off 40 even digits
    table = imagefit.from_arrays(images, tags, task="multilabel",
                                 names=["even", "big", "round"])
    result = imagefit.cv(table, runs_dir=str(tmp_path), **CV)
    found = imagefit.label_issues(result.cv_dir, data_issues=False, progress=False)
    flagged = set(found.issues.frame["row"])
    recall = len(flagged & set(dropped.tolist())) / len(dropped)
    assert recall > 0.6, (recall, len(flagged))
    # every planted row found (over 24 of them) is flagged for 'even', left off its labels
    found_planted = found.issues.frame[found.issues.frame["row"].isin(dropped)]
    assert len(found_planted) > 0.6 * len(dropped)
    for given, suggested in zip(found_planted["given"], found_planted["suggested"]):
        assert "even" in suggested.split(";") and "even" not in given.split(";"), (given,
                                                                                   suggested)


DIGIT_FILES = [f"d<{i}>.png" for i in range(600)]
SAME_FOLD_COPIES = {f"same_{k}.png": f"d<{i}>.png" for k, i in enumerate((10, 21, 32))}
OTHER_FOLD_COPIES = {f"other_{k}.png": f"d<{i}>.png" for k, i in enumerate((40, 51, 62))}
NOISE_FILES = [f"noise_{k}.png" for k in range(3)]


@pytest.fixture(scope="module")
def folder_cv(tmp_path_factory):
    """A CSV dataset of digit images as files, 10% of labels flipped, a CV with
    --find-label-issues (grid, Datalab and the report section). Planted for Datalab: three
    copies of digits in their originals' folds, three in other folds, and three images of
    uniform noise; the folds are given (row i in fold i % 5)."""
    root = tmp_path_factory.mktemp("folder")
    images, labels, flipped = flipped_digits(0.10, seed=2)
    rows, folds = [], []
    for i, name in enumerate(DIGIT_FILES):
        Image.fromarray(images[i]).resize((16, 16)).save(root / name)
        rows.append({"file": name, "label": f"n{labels[i]}"})
        folds.append(i % 5)
    for copies, moved in ((SAME_FOLD_COPIES, 0), (OTHER_FOLD_COPIES, 1)):
        for name, original in copies.items():
            shutil.copy(root / original, root / name)
            i = DIGIT_FILES.index(original)
            rows.append({"file": name, "label": f"n{labels[i]}"})
            folds.append((i + moved) % 5)
    noise = np.random.default_rng(3).integers(0, 256, (len(NOISE_FILES), 16, 16), np.uint8)
    for k, name in enumerate(NOISE_FILES):
        Image.fromarray(noise[k]).save(root / name)
        rows.append({"file": name, "label": f"n{k}"})
        folds.append(k)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    pd.DataFrame({"row": range(len(rows)), "fold": folds}).to_csv(root / "folds.csv",
                                                                   index=False)
    with isolated(root / "cache"):
        result = imagefit.cv(str(root / "labels.csv"), runs_dir=str(root / "runs"),
                             folds_file=str(root / "folds.csv"), find_label_issues=True, **CV)
    return root, result, set(flipped[flipped < 600].tolist())


def test_cv_find_label_issues_writes_the_csv_the_grid_and_the_report_section(folder_cv):
    root, result, flipped = folder_cv
    frame = pd.read_csv(result.cv_dir / "label_issues.csv", keep_default_na=False)
    files = pd.read_csv(root / "labels.csv")["file"]
    assert len(frame) and set(Path(p).name for p in frame["path"]) <= set(files)
    summary = json.loads((result.cv_dir / "label_issues.json").read_text())
    assert (result.cv_dir / summary["plot"]).is_file()
    assert "outliers_count" in summary and "near_duplicates_count" in summary
    features = np.load(result.cv_dir / summary["features"])
    assert features.shape[0] == len(files) and features.shape[1] > 1
    assert np.isfinite(features).all()
    page = (result.cv_dir / "report.html").read_text()
    section = page.split('<section id="label-issues">')[1].split("</section>")[0]
    assert "d&lt;" in section and "d<" not in section.replace("<td>", "").replace(
        "</td>", "").split("d&lt;")[0][-3:]
    assert 'src="data:image/png;base64,' in section
    hits = len(set(frame["row"]) & flipped)
    assert hits / len(frame) > 0.5


def test_datalab_pairs_each_copy_with_its_original_in_the_summary(folder_cv):
    """Exact copies get the same features: label_issues.json lists each with its original,
    nearest of all (score 0)."""
    root, result, _ = folder_cv
    summary = json.loads((result.cv_dir / "label_issues.json").read_text())
    listed = {Path(row["image"]).name: row for row in summary["near_duplicates"]}
    for copy, original in SAME_FOLD_COPIES.items():
        for name, other in ((copy, original), (original, copy)):
            assert name in listed, (name, sorted(listed))
            assert listed[name]["score"] == 0.0
            assert other in {Path(p).name for p in listed[name]["near"].split(", ")}
    assert summary["near_duplicates_count"] >= 2 * len(SAME_FOLD_COPIES)
    folds = pd.read_csv(result.cv_dir / "oof.csv").set_index("path")["fold"]
    for copy, original in OTHER_FOLD_COPIES.items():  # the planting the test below relies on
        assert folds[str(root / copy)] != folds[str(root / original)]


def test_datalab_finds_copies_across_folds_and_noise_images(folder_cv):
    """Every row's features lie in one space (no fold model's own): a copy in another fold
    than its original is its nearest neighbour, and noise is an outlier."""
    from imagefit.evaluation.label_issues import data_issues

    root, result, _ = folder_cv
    oof = pd.read_csv(result.cv_dir / "oof.csv", keep_default_na=False)
    found = data_issues(np.load(result.cv_dir / "features.npy"))
    place = {Path(p).name: i for i, p in enumerate(oof["path"])}
    duplicates, outliers = found["near_duplicate"], found["outlier"]
    for copy, original in OTHER_FOLD_COPIES.items():
        assert duplicates["is_near_duplicate_issue"].iloc[place[copy]], copy
        assert place[original] in set(duplicates["near_duplicate_sets"].iloc[place[copy]])
    for name in NOISE_FILES:
        assert outliers["is_outlier_issue"].iloc[place[name]], name


def test_drop_rows_never_touches_validation_or_test_rows(folder_cv, tmp_path):
    root, result, _ = folder_cv
    frame = pd.read_csv(result.cv_dir / "label_issues.csv", keep_default_na=False)
    data = pd.read_csv(root / "labels.csv")
    listed = {Path(p).name for p in frame["path"]}
    # the first 100 files become test rows, the listed ones among them must stay; the CSV
    # goes beside the test's files, naming the fixture's images
    data["split"] = ["test" if i < 100 else "train" for i in range(len(data))]
    data.to_csv(tmp_path / "split.csv", index=False)
    in_test = sum(1 for name in data["file"][:100] if name in listed)
    assert in_test > 0
    fit = imagefit.fit(str(tmp_path / "split.csv"), folder=str(root),
                       drop_rows=str(result.cv_dir / "label_issues.csv"), epochs=1,
                       progress=False, report=False, tta=False, runs_dir=str(tmp_path),
                       valid_pct=0.2)
    edits = fit.metrics["label_edits"]
    assert edits["action"] == "drop" and edits["listed"] == len(frame)
    assert edits["not_training"] >= in_test
    assert edits["dropped"] + edits["not_training"] == len(frame)
    control = imagefit.fit(str(tmp_path / "split.csv"), folder=str(root), epochs=1,
                           progress=False, report=False, tta=False, runs_dir=str(tmp_path),
                           valid_pct=0.2)
    assert fit.metrics["n_train"] == control.metrics["n_train"] - edits["dropped"]
    assert fit.metrics["n_valid"] == control.metrics["n_valid"]
    assert fit.metrics["n_test"] == control.metrics["n_test"] == 100


class TrainingTargets:
    """The targets of the training rows as the learner holds them when the fit starts."""

    def before_fit(self, learner) -> None:
        self.names = list(learner.task.names)
        self.rows = learner.train_loader.rows.tolist()
        self.targets = learner.train_loader.targets.clone()


def test_relabel_gives_the_top_rows_their_suggested_label(folder_cv, tmp_path):
    root, result, _ = folder_cv
    seen = TrainingTargets()
    fit = imagefit.fit(str(root / "labels.csv"), relabel=str(result.cv_dir /
                                                              "label_issues.csv"),
                       top=5, valid_pct=0, epochs=1, progress=False, report=False, tta=False,
                       runs_dir=str(tmp_path), callbacks=[seen])
    edits = fit.metrics["label_edits"]
    assert edits["action"] == "relabel" and edits["listed"] == 5
    assert edits["relabelled"] == 5 and edits["not_training"] == 0
    given = pd.read_csv(root / "labels.csv")
    top = pd.read_csv(result.cv_dir / "label_issues.csv", keep_default_na=False).head(5)
    relabelled = {list(given["file"]).index(Path(p).name): label
                  for p, label in zip(top["path"], top["suggested"])}
    assert sorted(seen.rows) == list(range(len(given)))  # all train (valid_pct 0)
    for row in seen.rows:
        label = relabelled.get(row, given["label"][row])
        assert seen.names[int(seen.targets[row])] == label, (row, label)
    assert all(label != given["label"][row] for row, label in relabelled.items())


def test_an_issues_csv_naming_files_not_in_the_data_is_one_line(folder_cv, tmp_path):
    root, result, _ = folder_cv
    frame = pd.read_csv(result.cv_dir / "label_issues.csv", keep_default_na=False)
    frame.loc[0, "path"] = str(root / "elsewhere.png")
    frame.to_csv(tmp_path / "bad.csv", index=False)
    done = subprocess.run([sys.executable, "-m", "imagefit", "fit", str(root / "labels.csv"),
                           "--drop-rows", str(tmp_path / "bad.csv"), "--runs-dir",
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"imagefit: error: option --drop-rows: {tmp_path / 'bad.csv'} names 1 file(s) that "
        f"are not in the data, e.g. {root / 'elsewhere.png'}: give the issues of a CV on this "
        "data")
    assert not (tmp_path / "runs").exists()


def test_option_errors_are_one_line():
    with pytest.raises(ImagefitError, match="^--top chooses among the rows of --drop-rows or "
                       "--relabel: give one of them$"):
        imagefit.FitConfig(top=3)
    with pytest.raises(ImagefitError, match="^--drop-rows and --relabel both act on the "
                       "listed rows: choose one$"):
        imagefit.FitConfig(drop_rows="a.csv", relabel="a.csv")
    with pytest.raises(ImagefitError, match="is not a CV directory"):
        imagefit.label_issues("/nonexistent")


def test_missing_cleanlab_names_the_extra(noisy_cv, monkeypatch):
    real_import = builtins.__import__

    def no_cleanlab(name, *args, **kwargs):
        if name == "cleanlab" or name.startswith("cleanlab."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    with pytest.raises(ImagefitError) as error:
        imagefit.label_issues(noisy_cv[0].cv_dir, options=LabelIssuesOptions(progress=False))
    assert str(error.value) == ("finding label issues needs cleanlab: pip install "
                                "'imagefit[labels]' (or pip install 'cleanlab[datalab]')")


@pytest.mark.parametrize("rule", ["low_self_confidence", "both", "prune_by_noise_rate"])
def test_the_flagged_rows_are_cleanlabs_own_for_each_rule(noisy_cv, rule):
    from cleanlab.filter import find_label_issues

    result, _ = noisy_cv
    found = imagefit.label_issues(result.cv_dir, data_issues=False, progress=False,
                                  filter_by=rule)
    oof = pd.read_csv(result.cv_dir / "oof.csv", dtype={"label": str})
    names = [str(i) for i in range(10)]
    probs = oof[[f"prob_{n}" for n in names]].to_numpy()
    labels = oof["label"].map({n: i for i, n in enumerate(names)}).to_numpy()
    direct = oof["row"].to_numpy()[find_label_issues(labels, probs, filter_by=rule)]
    assert set(found.issues.frame["row"]) == set(direct.tolist())
    assert json.loads((result.cv_dir / "label_issues.json").read_text())["filter_by"] == rule


def small_table(kind: str = "classification"):
    images = np.zeros((6, 8, 8), dtype=np.uint8)
    if kind == "classification":
        return imagefit.from_arrays(images, np.array([0, 1, 0, 1, 0, 1]), names=["a", "b"])
    if kind == "multilabel":
        return imagefit.from_arrays(images, np.eye(2, dtype=np.float32)[[0, 1] * 3],
                                    task="multilabel", names=["a", "b"])
    return imagefit.from_arrays(images, np.arange(6, dtype=np.float32))


def issues_csv(tmp_path, **columns) -> Path:
    frame = pd.DataFrame({"rank": [1], "row": [0], "fold": [0], "path": [""], "given": ["a"],
                          "suggested": ["b"], "score": [0.9], **columns})
    frame.to_csv(tmp_path / "issues.csv", index=False)
    return tmp_path / "issues.csv"


def test_every_issues_csv_error_is_one_line_naming_the_file(tmp_path):
    from imagefit.data.label_edits import apply_label_edits

    table = small_table()
    missing = tmp_path / "none.csv"
    written = tmp_path / "issues.csv"
    cases = [
        (None, "drop", f"option --drop-rows: {missing} not found: give the CSV written by "
         "imagefit label-issues"),
        ({"row": [99]}, "drop", f"option --drop-rows: {written} names row 99, but the data "
         "has 6 rows: give the issues of a CV on this data"),
        ({"suggested": ["zebra"]}, "relabel", f"option --relabel: {written} suggests "
         "'zebra', which is not a class of the data: give the issues of a CV on this data"),
    ]
    for columns, action, message in cases:
        path = missing if columns is None else issues_csv(tmp_path, **columns)
        with pytest.raises(ImagefitError) as error:
            apply_label_edits(table, str(path) if action == "drop" else None,
                              str(path) if action == "relabel" else None, None, None)
        assert str(error.value) == message
    pd.DataFrame({"rank": [1], "row": [0]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ImagefitError, match=r"short.csv has no column path: give the CSV "
                       "written by imagefit label-issues$"):
        apply_label_edits(table, str(tmp_path / "short.csv"), None, None, None)
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(ImagefitError, match="binary.csv is not a readable CSV file"):
        apply_label_edits(table, str(tmp_path / "binary.csv"), None, None, None)
    with pytest.raises(ImagefitError, match="suggests 'zebra', which is not a label of the "
                       "data$"):
        apply_label_edits(small_table("multilabel"), None,
                          str(issues_csv(tmp_path, suggested=["a;zebra"])), None, None)
    with pytest.raises(ImagefitError, match="^option --relabel: relabelling is for "
                       "classification data$"):
        apply_label_edits(small_table("regression"), None, str(issues_csv(tmp_path)), None,
                          None)


def test_label_issue_errors_of_the_predictions_and_options(tmp_path):
    from imagefit.evaluation.label_issues import find_label_issues
    from imagefit.tasks import Task

    task = Task("classification", ["a", "b"])
    oof = pd.DataFrame({"row": [0, 1], "fold": [0, 0], "label": ["a", "b"],
                        "prob_a": [0.9, 0.2], "prob_b": [0.1, 0.8]})
    with pytest.raises(ImagefitError, match="^oof.csv has no column prob_b: it was not "
                       "written by imagefit cv for this model; run imagefit cv again$"):
        find_label_issues(oof.drop(columns="prob_b"), task)
    with pytest.raises(ImagefitError, match="^option --method: unknown 'loss'; choose one "
                       "of self_confidence, "):
        find_label_issues(oof, task, method="loss")
    with pytest.raises(ImagefitError, match="^option --filter-by: unknown 'all'; choose one "
                       "of low_self_confidence, "):
        find_label_issues(oof, task, filter_by="all")
    with pytest.raises(ImagefitError, match="^label issues are found for classification; "
                       "this CV's task is regression: look at its largest errors"):
        find_label_issues(oof, Task("regression", ["age"]))
    with pytest.raises(ImagefitError, match="^--find-label-issues is for classification; "
                       "this data's task is regression: look at its largest errors in the "
                       "CV report instead$"):
        imagefit.cv(small_table("regression"), find_label_issues=True,
                    runs_dir=str(tmp_path), progress=False)
    assert not any(tmp_path.iterdir())  # refused before the CV directory
