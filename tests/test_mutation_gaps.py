"""Narrow tests that bench/mutation_check.py names: behaviour no other test pinned down
(which trial --confirm chooses, which rule 'auto' picks, the pixel test of near-duplicates),
or pinned down only through a fixture that trains a cross-validation for minutes
(--drop-rows, --relabel, the rule given to cleanlab)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import imagefit
from imagefit.data.label_edits import DROPPED, apply_label_edits
from imagefit.data.near_duplicates import near_duplicate_pairs
from imagefit.evaluation.label_issues import find_label_issues
from imagefit.tasks import Task
from imagefit.workflows import tune

# -- tune --confirm ----------------------------------------------------------------------------


def test_confirm_chooses_the_best_median_not_the_best_search_value(tmp_path, monkeypatch):
    """--confirm refits the top trials on fresh seeds: the search's best (trial 3, 0.95 on
    its one split) refits worse than the runner-up (trial 7), which best.yaml then holds."""
    refits = {0.01: [0.84, 0.85, 0.86], 0.1: [0.78, 0.80, 0.82], 0.03: [0.89, 0.90, 0.91]}

    def run_fit(table, options, run_dir, budget):
        return SimpleNamespace(metrics={"valid_accuracy": refits[options["lr"]][
            options["seed"] - 1]})

    monkeypatch.setattr(tune, "run_fit", run_fit)
    monkeypatch.setattr(tune, "default_trial", lambda table, cfg, space: {"lr": 0.01})
    monkeypatch.setattr(tune, "Budget", SimpleNamespace(from_options=lambda options: None))
    search = SimpleNamespace(metric="valid_accuracy", cfg=SimpleNamespace(seed=0), table=None,
                             space=[], tune_dir=tmp_path,
                             trial_options=lambda params: {"lr": 0.01, **params})
    candidates = [{"number": 3, "value": 0.95, "params": {"lr": 0.1}},
                  {"number": 7, "value": 0.93, "params": {"lr": 0.03}}]
    confirmed = tune.confirm(search, candidates, seeds=3)
    assert confirmed["seeds"] == [1, 2, 3]
    assert confirmed["chosen"] == 7 and confirmed["chosen_params"] == {"lr": 0.03}
    assert confirmed["median_chosen"] == 0.90 and confirmed["median_defaults"] == 0.85
    assert confirmed["chosen_beats_defaults"]


# -- label issues: the rules ---------------------------------------------------------------

NAMES = ["a", "b", "c"]


def noisy_out_of_fold(column: str = "label") -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Out-of-fold probabilities of 90 rows of three classes, nine labels flipped: the frame
    imagefit cv writes, the given class indices and the probabilities."""
    rng = np.random.default_rng(0)
    true = np.arange(90) % 3
    probs = rng.dirichlet(np.full(3, 0.7), 90) * 0.5 + np.eye(3)[true] * 0.5
    given = true.copy()
    given[:9] = (true[:9] + 1) % 3
    frame = pd.DataFrame({"row": np.arange(90), "fold": np.arange(90) % 5})
    if column == "label":
        frame["label"] = np.array(NAMES)[given]
    else:
        frame["labels"] = [NAMES[k] for k in true]
    for k, name in enumerate(NAMES):
        frame[f"prob_{name}"] = probs[:, k]
    return frame, given, probs


def test_auto_flags_by_low_self_confidence_for_single_label_data():
    """'auto' is the rule that found planted errors best: low_self_confidence for
    single-label data, both for multi-label data (docs/BENCHMARKS.md)."""
    pytest.importorskip("cleanlab")
    from cleanlab.filter import find_label_issues as cleanlabs

    oof, given, probs = noisy_out_of_fold()
    found = find_label_issues(oof, Task("classification", NAMES))
    assert found.extra["filter_by"] == "low_self_confidence"
    expected = cleanlabs(given, probs, filter_by="low_self_confidence")
    assert set(found.frame["row"]) == set(np.flatnonzero(expected).tolist())
    multilabel = find_label_issues(noisy_out_of_fold("labels")[0], Task("multilabel", NAMES))
    assert multilabel.extra["filter_by"] == "both"


def test_each_rule_flags_cleanlabs_own_rows():
    pytest.importorskip("cleanlab")
    from cleanlab.filter import find_label_issues as cleanlabs

    oof, given, probs = noisy_out_of_fold()
    flagged = {}
    for rule in ("low_self_confidence", "both", "prune_by_noise_rate"):
        found = find_label_issues(oof, Task("classification", NAMES), filter_by=rule)
        flagged[rule] = set(found.frame["row"])
        assert flagged[rule] == set(np.flatnonzero(cleanlabs(given, probs,
                                                              filter_by=rule)).tolist()), rule
    assert len({frozenset(rows) for rows in flagged.values()}) > 1  # the rules differ here


# -- label issues: the fit acting on them ---------------------------------------------------


def issues_table(tmp_path) -> tuple[imagefit.Table, str]:
    """Six rows (train, valid, test, train, train, train) of classes a/b, and an issues CSV
    listing rows 0 (train) and 1 (valid), both suggested 'b'."""
    table = imagefit.from_arrays(np.zeros((6, 8, 8), dtype=np.uint8),
                                 np.array([0, 0, 0, 1, 0, 1]), names=["a", "b"],
                                 split=["train", "valid", "test", "train", "train", "train"])
    pd.DataFrame({"rank": [1, 2], "row": [0, 1], "fold": [0, 0], "path": ["", ""],
                  "given": ["a", "a"], "suggested": ["b", "b"], "score": [0.9, 0.8]}).to_csv(
        tmp_path / "issues.csv", index=False)
    return table, str(tmp_path / "issues.csv")


def test_drop_rows_leaves_out_the_listed_training_rows_only(tmp_path):
    table, issues = issues_table(tmp_path)
    edited, record = apply_label_edits(table, drop_rows=issues, relabel=None, top=None,
                                       min_score=None)
    assert edited.split.tolist() == [DROPPED, "valid", "test", "train", "train", "train"]
    assert record == {"file": issues, "action": "drop", "listed": 2, "not_training": 1,
                      "dropped": 1}
    assert edited.targets.tolist() == table.targets.tolist()


def test_relabel_gives_the_listed_training_rows_the_suggested_class(tmp_path):
    table, issues = issues_table(tmp_path)
    edited, record = apply_label_edits(table, drop_rows=None, relabel=issues, top=None,
                                       min_score=None)
    assert edited.targets.tolist() == [1, 0, 0, 1, 0, 1]  # row 1 is validation: kept
    assert record["relabelled"] == 1 and record["not_training"] == 1
    assert edited.split.tolist() == table.split.tolist()



# -- near-duplicates -------------------------------------------------------------------------


def test_the_same_shape_with_other_pixels_is_not_a_near_duplicate():
    """The hash and the thumbnails cannot tell a fine pattern (a fabric, a different shirt of
    the same shape on Fashion-MNIST): the pixels decide."""
    y, x = np.mgrid[0:48, 0:48]
    picture = (60 + 2 * x + y).astype(np.uint8)
    pattern = np.where((x + y) % 2 == 0, 20, -20)  # sums to 0 over every hash and thumbnail cell
    stack = np.stack([picture, (picture + pattern).astype(np.uint8), picture + 1])[..., None]
    pairs, diffs = near_duplicate_pairs(stack, np.arange(3))
    assert pairs.tolist() == [[0, 2]] and diffs.tolist() == [1.0]  # brightness +1 is a copy
