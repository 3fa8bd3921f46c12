"""Metric values against small cases computed by hand, TTA, top losses, --metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from imagefit.augment.pipeline import BatchPipeline
from imagefit.augment.presets import resolve_augment
from imagefit.config import AugmentOptions
from imagefit.errors import ImagefitError
from imagefit.evaluation import inference
from imagefit.forward import TTA, model_outputs, tta_augment
from imagefit.metrics import all_metrics, best_threshold, compute_metrics, per_class_metrics
from imagefit.report.interpret import item_losses, most_confused, top_losses
from imagefit.tasks import Task


def logits_for(predicted: list[int], n: int, margin: float = 4.0) -> torch.Tensor:
    outputs = torch.zeros(len(predicted), n)
    outputs[torch.arange(len(predicted)), torch.tensor(predicted)] = margin
    return outputs


# predicted [0, 0, 1, 2, 1, 2] against actual [0, 1, 1, 2, 2, 2]
CLASSES = Task("classification", ["a", "b", "c"])
PREDICTED = [0, 0, 1, 2, 1, 2]
ACTUAL = torch.tensor([0, 1, 1, 2, 2, 2])


def test_single_label_metrics_match_hand_computed_values():
    values = all_metrics(CLASSES, logits_for(PREDICTED, 3), ACTUAL)
    assert values["accuracy"] == pytest.approx(4 / 6)
    assert values["error_rate"] == pytest.approx(2 / 6)
    # recall per class 1, 1/2, 2/3; precision 1/2, 1/2, 1
    assert values["balanced_accuracy"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert values["recall"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert values["precision"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert values["f1"] == pytest.approx((2 / 3 + 0.5 + 0.8) / 3)
    assert values["f1_micro"] == pytest.approx(4 / 6)
    # observed agreement 2/3, chance agreement (2*1 + 2*2 + 2*3) / 36 = 1/3
    assert values["kappa"] == pytest.approx(0.5)
    # quadratic weights (i-j)^2/4: observed 0.5/6, expected 2/6
    assert values["quadratic_kappa"] == pytest.approx(0.75)


def test_ece_and_pr_auc_match_hand_computed_values():
    """Four items, two classes; the probabilities are chosen so that each top confidence
    falls in a bin of its own (15 bins) and each class ranks one negative above a
    positive."""
    task = Task("classification", ["a", "b"])
    probabilities = torch.tensor([[0.91, 0.09], [0.23, 0.77], [0.42, 0.58], [0.31, 0.69]])
    targets = torch.tensor([0, 1, 1, 0])
    values = all_metrics(task, probabilities.log(), targets)
    # right, right, right, wrong: |1-0.91| + |1-0.77| + |1-0.58| + |0-0.69|, over 4
    assert values["ece"] == pytest.approx((0.09 + 0.23 + 0.42 + 0.69) / 4, abs=1e-6)
    # each class: a positive first, a negative, then its other positive: AP = (1 + 2/3) / 2
    assert values["pr_auc"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)
    labels = Task("multilabel", ["x", "y"])
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.8], [0.4, 0.7], [0.1, 0.3]])
    truth = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # x: 1, 0, 1 in score order -> (1 + 2/3) / 2; y: 1, 0, 1 -> (1 + 2/3) / 2
    assert all_metrics(labels, torch.logit(scores), truth)["pr_auc"] == pytest.approx(
        (1 + 2 / 3) / 2, abs=1e-6)


def test_log_loss_top_k_and_ranking_metrics():
    outputs = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0],
                            [2.0, 0.0, 1.0]])
    targets = torch.tensor([0, 2, 1, 0])
    values = all_metrics(CLASSES, outputs, targets)
    expected = -np.mean([math.log(torch.softmax(outputs[i], 0)[t].item())
                         for i, t in enumerate(targets.tolist())])
    assert values["log_loss"] == pytest.approx(expected, rel=1e-5)
    # top-2: item 2's second choice is class 0, not 1; the others hold their target
    assert values["top_k_accuracy"] == pytest.approx(3 / 4)
    # class a against the rest: positives score 2, 2; negatives 0, 1 -> every pair ranked
    # right; class b: positive scores 0 against negatives 1, 2, 0 -> 0.5 of a tie... by hand:
    probs = outputs.softmax(1)
    b_pos = probs[2, 1]
    b_neg = probs[[0, 1, 3], 1]
    auc_b = ((b_pos > b_neg).float() + 0.5 * (b_pos == b_neg).float()).mean().item()
    c_pos = probs[1, 2]
    c_neg = probs[[0, 2, 3], 2]
    auc_c = ((c_pos > c_neg).float() + 0.5 * (c_pos == c_neg).float()).mean().item()
    assert values["roc_auc"] == pytest.approx((1.0 + auc_b + auc_c) / 3, abs=1e-6)


def test_classes_absent_from_the_split_are_left_out_of_ranking_averages():
    # only classes a and b occur: the macro ROC-AUC is theirs, not dragged down by c's zero
    outputs = logits_for([0, 1, 0, 1], 3)
    values = all_metrics(CLASSES, outputs, torch.tensor([0, 1, 0, 1]))
    assert values["roc_auc"] == pytest.approx(1.0)
    single = all_metrics(CLASSES, logits_for([0, 0], 3), torch.tensor([0, 0]))
    assert math.isnan(single["roc_auc"])


def test_per_class_rows_and_most_confused_pairs():
    rows = per_class_metrics(CLASSES, logits_for(PREDICTED, 3), ACTUAL)
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert [r["support"] for r in rows] == [1, 2, 3]
    assert [r["recall"] for r in rows] == pytest.approx([1.0, 0.5, 2 / 3])
    assert [r["precision"] for r in rows] == pytest.approx([0.5, 0.5, 1.0])
    confusion = np.array([[5, 0, 1], [3, 4, 0], [0, 3, 9]])
    pairs = most_confused(confusion, ["a", "b", "c"])
    assert [(p["actual"], p["predicted"], p["count"]) for p in pairs] == [
        ("b", "a", 3), ("c", "b", 3), ("a", "c", 1)]
    assert pairs[0]["share_of_actual"] == pytest.approx(3 / 7)


LABELS = Task("multilabel", ["x", "y"])
ML_TARGETS = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])


def probability_logits(probs) -> torch.Tensor:
    return torch.logit(torch.tensor(probs, dtype=torch.float64)).float()


def test_multilabel_metrics_match_hand_computed_values():
    # at 0.5 the predictions are [1,0], [1,0], [0,1], [1,0]
    outputs = probability_logits([[0.9, 0.1], [0.8, 0.4], [0.125, 0.7], [0.6, 0.05]])
    values = all_metrics(LABELS, outputs, ML_TARGETS)
    assert values["subset_accuracy"] == pytest.approx(0.5)
    assert values["hamming_loss"] == pytest.approx(2 / 8)
    assert values["accuracy"] == pytest.approx(6 / 8)
    # x: TP 2, FP 1, FN 0 -> 0.8; y: TP 1, FP 0, FN 1 -> 2/3
    assert values["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert values["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_best_threshold_maximizes_macro_f1():
    outputs = probability_logits([[0.9, 0.1], [0.8, 0.4], [0.125, 0.7], [0.6, 0.05]])
    threshold, f1 = best_threshold(LABELS, outputs, ML_TARGETS)
    # between 0.125 and 0.4 both labels are right but x's row 4 (0.6): F1 0.8 and 1
    assert threshold == pytest.approx(0.13)
    assert f1 == pytest.approx(0.9)


def test_regression_metrics_match_hand_computed_values():
    task = Task("regression", ["age"])
    predicted = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    actual = torch.tensor([[2.0], [2.0], [2.0], [6.0]])
    values = all_metrics(task, predicted, actual)
    assert values["mae"] == pytest.approx(1.0)
    assert values["rmse"] == pytest.approx(math.sqrt(1.5))
    assert values["r2"] == pytest.approx(0.5)
    assert values["mape"] == pytest.approx((0.5 + 0 + 0.5 + 1 / 3) / 4)


def test_regression_metrics_are_in_the_targets_units():
    task = Task("regression", ["age"], target_mean=[40.0], target_std=[10.0])
    standardized = torch.tensor([[0.0], [1.0]])  # 40 and 50 years
    values = all_metrics(task, standardized, torch.tensor([[0.5], [1.0]]))  # 45 and 50
    assert values["mae"] == pytest.approx(2.5)


def test_top_losses_are_ordered_largest_first():
    outputs = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 1, 0])
    task = Task("classification", ["p", "q"])
    losses = item_losses(task, outputs, targets)
    order = top_losses(task, outputs, targets, k=3)
    assert order.tolist() == [1, 2, 4]
    assert (np.diff(losses[order].numpy()) <= 0).all()
    regression = Task("regression", ["v"])
    worst = top_losses(regression, torch.tensor([[1.0], [5.0], [2.0]]),
                       torch.tensor([[1.0], [1.0], [4.0]]), k=2)
    assert worst.tolist() == [1, 2]


def test_metrics_option_chooses_the_per_epoch_columns_and_rejects_unknown_names():
    from imagefit.workflows.build import epoch_metrics

    assert epoch_metrics("classification", ["kappa", "f1"]) == ["accuracy", "kappa", "f1"]
    assert epoch_metrics("regression", None) == []
    with pytest.raises(ImagefitError, match=r"--metrics: unknown classification metric "
                                            r"'r2'; choose from accuracy"):
        epoch_metrics("classification", ["r2"])
    task = Task("classification", ["a", "b", "c"], metrics=["accuracy", "kappa"])
    assert set(compute_metrics(task, logits_for(PREDICTED, 3), ACTUAL)) == {"accuracy",
                                                                            "kappa"}


# -- test-time augmentation --------------------------------------------------------------

class LeftRight(nn.Module):
    """Class 0 when the left half is brighter: flipping an image swaps its scores."""

    def forward(self, x):
        half = x.shape[-1] // 2
        left = x[..., :half].mean(dim=(1, 2, 3))
        right = x[..., half:].mean(dim=(1, 2, 3))
        return torch.stack([left - right, right - left], dim=1) * 3.0


def some_images(n: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 8, 8, 1), dtype=torch.uint8, generator=generator)


def test_tta_without_augmentation_equals_plain_evaluation():
    task = Task("classification", ["left", "right"])
    pipeline = BatchPipeline([0.5], [0.25])
    images, rows = some_images(), np.arange(10)
    plain = model_outputs(LeftRight(), pipeline, task, images, rows, 4)
    none = TTA(n=4, augment=resolve_augment("none"))
    averaged = model_outputs(LeftRight(), pipeline, task, images, rows, 4, none)
    assert torch.allclose(averaged.softmax(1), plain.softmax(1), atol=1e-6)


def test_tta_averages_the_original_and_its_versions():
    task = Task("classification", ["left", "right"])
    pipeline = BatchPipeline([0.5], [0.25])
    images, rows = some_images(), np.arange(10)
    plain = model_outputs(LeftRight(), pipeline, task, images, rows, 4).softmax(1)
    flip = TTA(n=1, augment=AugmentOptions(flip=1.0))
    averaged = model_outputs(LeftRight(), pipeline, task, images, rows, 4, flip).softmax(1)
    # the flipped version's probabilities are the original's swapped
    assert torch.allclose(averaged, (plain + plain.flip(1)) / 2, atol=1e-5)


def test_tta_auto_reuses_label_preserving_training_augmentation():
    trained = resolve_augment("side_on").model_dump()
    trained.update(mixup=0.4, erase_p=0.5)
    chosen = tta_augment("auto", trained)
    assert chosen.rotate == 10.0 and chosen.flip == 0.5
    assert chosen.mixup == 0 and chosen.erase_p == 0
    assert tta_augment("auto", resolve_augment("none")) == resolve_augment("light")
    assert tta_augment("none", trained) == AugmentOptions()


def test_evaluate_with_tta_reports_both_figures(tmp_path):
    from imagefit import api

    run = api.fit("builtin:digits", epochs=1, progress=False, runs_dir=str(tmp_path),
                  report=False, tta=False).run_dir
    results = inference.evaluate(run, "builtin:digits", tta=True, tta_augment="none",
                                 progress=False)
    assert results["tta_accuracy"] == pytest.approx(results["accuracy"], abs=1e-6)
    shifted = inference.evaluate(run, "builtin:digits", tta=True, tta_augment="light",
                                 progress=False)
    assert shifted["accuracy"] == results["accuracy"]
    assert shifted["tta_loss"] != pytest.approx(results["loss"], rel=1e-4)  # versions averaged
    again = inference.evaluate(run, "builtin:digits", tta=True, tta_augment="light",
                               progress=False)
    assert again["tta_loss"] == shifted["tta_loss"]  # seeded: the same versions each time


def test_cli_evaluate_tta_prints_both_columns_and_predict_takes_tta(tmp_path, capsys):
    from imagefit import api, cli

    run = api.fit("builtin:digits", epochs=1, progress=False, runs_dir=str(tmp_path),
                  report=False, tta=False).run_dir
    assert cli.main(["evaluate", str(run), "builtin:digits", "--tta", "--no-progress"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "plain", "with", "TTA"]
    accuracy = next(line for line in out.splitlines() if line.startswith("accuracy "))
    assert len(accuracy.split()) == 3
    images = tmp_path / "pngs"
    from sklearn.datasets import load_digits

    from conftest import write_image

    digits = load_digits()
    for i in range(6):
        write_image(images / f"{i}.png", (digits.images[i] * 16).astype(np.uint8))
    plain = inference.predict(run, [images], progress=False)
    same = inference.predict(run, [images], progress=False, tta=True, tta_augment="none")
    assert np.allclose(plain.filter(like="prob_").to_numpy(),
                       same.filter(like="prob_").to_numpy(), atol=1e-6)
