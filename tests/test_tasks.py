"""Task kinds: losses, activations, decoding, regression target scaling and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imagefit.metrics import compute_metrics
from imagefit.tasks import KINDS, Task, task_class

# -- losses -------------------------------------------------------------------------------


def test_classification_loss_is_cross_entropy():
    task = Task("classification", ["a", "b", "c"])
    outputs = torch.zeros(2, 3)
    assert task.loss(outputs, torch.tensor([0, 2])).item() == pytest.approx(math.log(3))
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    assert task.loss(confident, torch.tensor([0])).item() < 1e-3
    assert task.loss(confident, torch.tensor([1])).item() > 9


def test_classification_loss_accepts_soft_targets():
    task = Task("classification", ["a", "b"])
    outputs = torch.tensor([[2.0, 0.0]])
    hard = task.loss(outputs, torch.tensor([0]))
    soft = task.loss(outputs, torch.tensor([[1.0, 0.0]]))
    assert soft.item() == pytest.approx(hard.item())
    mixed = task.loss(outputs, torch.tensor([[0.5, 0.5]]))
    expected = 0.5 * -math.log(1 / (1 + math.exp(-2))) + 0.5 * -math.log(1 / (1 + math.exp(2)))
    assert mixed.item() == pytest.approx(expected, rel=1e-5)


def test_multilabel_loss_is_binary_cross_entropy_on_logits():
    task = Task("multilabel", ["x", "y"])
    assert task.loss(torch.zeros(3, 2), torch.ones(3, 2)).item() == pytest.approx(math.log(2))
    outputs = torch.tensor([[3.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0]])
    expected = (math.log(1 + math.exp(-3)) + math.log(1 + math.exp(-1))) / 2
    assert task.loss(outputs, targets).item() == pytest.approx(expected, rel=1e-5)


def test_regression_losses():
    outputs = torch.tensor([[1.0], [2.0]])
    targets = torch.zeros(2, 1)
    assert Task("regression", ["y"]).loss(outputs, targets).item() == pytest.approx(2.5)
    l1 = Task("regression", ["y"], regression_loss="l1")
    assert l1.loss(outputs, targets).item() == pytest.approx(1.5)


# -- activation and decoding --------------------------------------------------------------


def test_classification_activate_and_decode():
    task = Task("classification", ["cat", "dog", "bird"])
    outputs = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    probs = task.activate(outputs)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(probs, outputs.softmax(dim=1))
    assert task.decode(probs) == ["dog", "cat", "bird"]
    assert task.activate(outputs.half()).dtype == torch.float32


def test_multilabel_activate_and_decode():
    task = Task("multilabel", ["sky", "sea", "tree"])
    outputs = torch.tensor([[2.0, -2.0, 0.5], [-3.0, -3.0, -3.0], [1.0, 1.0, 1.0]])
    probs = task.activate(outputs)
    torch.testing.assert_close(probs, outputs.sigmoid())
    assert task.decode(probs) == ["sky;tree", "", "sky;sea;tree"]
    strict = Task("multilabel", ["sky", "sea", "tree"], threshold=0.8)
    assert strict.decode(probs) == ["sky", "", ""]
    assert task.decode(torch.tensor([[0.5, 0.49, 0.51]])) == ["sky;tree"]


def test_regression_activate_and_decode_in_own_units():
    task = Task("regression", ["age", "height"])
    task.fit_target_scaling(np.array([[10.0, 100.0], [20.0, 300.0]]))
    assert task.target_mean == [15.0, 200.0]
    assert task.target_std == [5.0, 100.0]
    outputs = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    values = task.activate(outputs)
    torch.testing.assert_close(values, torch.tensor([[15.0, 200.0], [20.0, 100.0]]))
    decoded = task.decode(values)
    assert isinstance(decoded, np.ndarray)
    np.testing.assert_allclose(decoded, [[15, 200], [20, 100]])


def test_unscaled_regression_passes_values_through():
    task = Task("regression", ["y"])
    values = torch.tensor([[1.5], [-2.0]])
    torch.testing.assert_close(task.activate(values), values)
    torch.testing.assert_close(task.encode_targets(np.array([1.5, -2.0])), values)


# -- targets and scaling ------------------------------------------------------------------


def test_encode_targets_per_kind():
    classes = Task("classification", ["a", "b"]).encode_targets(np.array([1, 0, 1]))
    assert classes.dtype == torch.int64 and classes.tolist() == [1, 0, 1]
    labels = Task("multilabel", ["a", "b"]).encode_targets(np.array([[1, 0], [1, 1]]))
    assert labels.dtype == torch.float32 and labels.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    values = Task("regression", ["y"]).encode_targets(np.array([1.0, 2.0]))
    assert values.shape == (2, 1) and values.dtype == torch.float32


def test_regression_scaling_round_trip():
    rng = np.random.default_rng(0)
    targets = rng.normal([1000.0, -3.0, 0.01], [250.0, 0.5, 0.002], size=(50, 3))
    task = Task("regression", ["a", "b", "c"])
    task.fit_target_scaling(targets[:40])
    encoded = task.encode_targets(targets[:40])
    assert encoded.dtype == torch.float32
    torch.testing.assert_close(encoded.mean(dim=0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(encoded.std(dim=0, unbiased=False), torch.ones(3), atol=1e-4,
                               rtol=0)
    back = task.unscale(task.encode_targets(targets)).double().numpy()
    np.testing.assert_allclose(back, targets, rtol=1e-5, atol=1e-6)


def test_regression_scaling_of_a_constant_target():
    task = Task("regression", ["y"])
    task.fit_target_scaling(np.full(5, 7.0))
    assert task.target_std == [1.0]
    encoded = task.encode_targets(np.full(5, 7.0))
    assert torch.isfinite(encoded).all() and (encoded == 0).all()
    torch.testing.assert_close(task.unscale(encoded), torch.full((5, 1), 7.0))


def test_target_scaling_only_for_regression():
    task = Task("classification", ["a", "b"])
    task.fit_target_scaling(np.array([0, 1, 1]))
    assert task.target_mean == [] and task.target_std == []


def test_task_round_trips_through_a_dict():
    task = Task("regression", ["y"], regression_loss="l1", threshold=0.3)
    task.fit_target_scaling(np.array([1.0, 3.0]))
    again = Task.from_dict(task.to_dict())
    assert again == task
    assert again.unscale(torch.tensor([[1.0]])).item() == pytest.approx(3.0)


def test_task_properties():
    assert tuple(KINDS)[:3] == ("classification", "multilabel", "regression")
    assert Task("classification", ["a", "b", "c"]).n_out == 3
    assert Task("classification", ["a"]).main_metric == "accuracy"
    assert Task("multilabel", ["a"]).main_metric == "f1"
    assert Task("regression", ["a"]).main_metric == "mae"
    for kind in ("classification", "multilabel", "regression"):
        task = Task(kind, ["a"])
        assert task.main_metric in task_class(kind).default_metrics
        assert task.metric_names == ("loss", *task_class(kind).default_metrics)


def test_an_unknown_kind_is_an_error_never_another_kind():
    with pytest.raises(ValueError, match="unknown task kind 'survival': one of classification"):
        Task("survival", ["a", "b"])
    with pytest.raises(ValueError, match="unknown task kind 'survival'"):
        task_class("survival")


# -- metrics ------------------------------------------------------------------------------


def test_classification_accuracy_on_four_samples():
    task = Task("classification", ["a", "b", "c"])
    outputs = torch.tensor([
        [5.0, 0.0, 0.0],  # a, right
        [0.0, 5.0, 0.0],  # b, right
        [0.0, 0.0, 5.0],  # c, wrong (b)
        [0.0, 5.0, 0.0],  # b, right
    ])
    targets = torch.tensor([0, 1, 1, 1])
    metrics = compute_metrics(task, outputs, targets)
    assert set(metrics) == set(task_class("classification").default_metrics)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["error_rate"] == pytest.approx(0.25)
    soft = torch.nn.functional.one_hot(targets, 3).float() * 0.8 + 0.2 / 3
    assert compute_metrics(task, outputs, soft)["accuracy"] == pytest.approx(0.75)


def test_multilabel_accuracy_and_macro_f1():
    task = Task("multilabel", ["x", "y"])
    predicted = torch.tensor([[1, 0], [0, 1], [0, 1], [0, 1]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    outputs = torch.where(predicted.bool(), 4.0, -4.0)  # logits
    metrics = compute_metrics(task, outputs, targets)
    assert set(metrics) == set(task_class("multilabel").default_metrics)
    # x: tp 1, fp 0, fn 1 -> f1 2/3; y: tp 2, fp 1, fn 0 -> f1 4/5
    assert metrics["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(6 / 8)


def test_multilabel_metrics_use_the_task_threshold():
    outputs = torch.logit(torch.tensor([[0.6, 0.9]]))
    targets = torch.tensor([[0.0, 1.0]])
    assert compute_metrics(Task("multilabel", ["a", "b"]), outputs, targets)["accuracy"] == \
        pytest.approx(0.5)
    high = Task("multilabel", ["a", "b"], threshold=0.7)
    assert compute_metrics(high, outputs, targets)["accuracy"] == pytest.approx(1.0)


def test_regression_metrics_in_original_units():
    task = Task("regression", ["y"])
    task.fit_target_scaling(np.array([8.0, 12.0]))  # mean 10, std 2
    actual = np.array([11.0, 12.0, 4.0])
    targets = task.encode_targets(actual)
    outputs = torch.tensor([[0.0], [1.0], [-3.5]])  # predicts 10, 12, 3 in own units
    metrics = compute_metrics(task, outputs, targets)
    assert set(metrics) == set(task_class("regression").default_metrics)
    assert metrics["mae"] == pytest.approx((1 + 0 + 1) / 3, rel=1e-5)
    assert metrics["rmse"] == pytest.approx(math.sqrt((1 + 0 + 1) / 3), rel=1e-5)


def test_multi_target_regression_metrics():
    task = Task("regression", ["a", "b"])
    task.fit_target_scaling(np.array([[0.0, 0.0], [2.0, 200.0]]))  # std 1 and 100
    actual = np.array([[1.0, 100.0], [2.0, 300.0]])
    targets = task.encode_targets(actual)
    predicted = task.encode_targets(np.array([[1.0, 104.0], [2.0, 300.0]]))
    metrics = compute_metrics(task, predicted, targets)
    assert metrics["mae"] == pytest.approx(4 / 4, rel=1e-4)
    assert metrics["rmse"] == pytest.approx(math.sqrt(16 / 4), rel=1e-4)
