"""Metrics of each task kind, computed with torchmetrics from raw outputs and encoded targets.

Every metric is a function of whole-split outputs, registered by name under its task kind;
``--metrics`` chooses the ones shown per epoch and ``all_metrics`` computes every one (the
report's final figures). Classes absent from the targets are left out of the macro
averages of ROC-AUC and PR-AUC (they have no positives to rank), and ROC-AUC of a split with
a single class present is NaN rather than a warning and a misleading zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional import (
    mean_absolute_error,
    mean_absolute_percentage_error,
    mean_squared_error,
    r2_score,
)
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_average_precision,
    multiclass_calibration_error,
    multiclass_cohen_kappa,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multilabel_accuracy,
    multilabel_auroc,
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_hamming_distance,
    multilabel_precision,
    multilabel_recall,
)

from .tasks import Classification, MultiLabel, Regression, Task

Metric = Callable[[Task, torch.Tensor, torch.Tensor], float]
TOP_K = 5


def top_k(task: Task) -> int:
    """The k of top-k accuracy: 5, or one less than the number of classes when fewer."""
    return max(1, min(TOP_K, task.n_out - 1))


def _present_mean(values: torch.Tensor, support: torch.Tensor) -> float:
    """Mean over the classes that occur (a class with no positives has no ranking)."""
    keep = support > 0
    if keep.sum() == 0:
        return float("nan")
    return values[keep].float().mean().item()


def _quiet(function, *args, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return function(*args, **kwargs)


# -- single-label classification: outputs (N, C) logits, targets (N,) indices -------------

def _class_kwargs(task: Task) -> dict:
    return {"num_classes": task.n_out}


def _accuracy(task, outputs, targets):
    return multiclass_accuracy(outputs, targets, average="micro", **_class_kwargs(task)).item()


def _roc_auc(task, outputs, targets):
    support = torch.bincount(targets, minlength=task.n_out)
    if (support > 0).sum() < 2:
        return float("nan")
    per_class = _quiet(multiclass_auroc, outputs, targets, average=None, **_class_kwargs(task))
    return _present_mean(per_class, support)


def _pr_auc(task, outputs, targets):
    support = torch.bincount(targets, minlength=task.n_out)
    per_class = _quiet(multiclass_average_precision, outputs, targets, average=None,
                       **_class_kwargs(task))
    return _present_mean(per_class, support)


CLASSIFICATION: dict[str, Metric] = {
    "accuracy": _accuracy,
    "error_rate": lambda task, o, t: 1.0 - _accuracy(task, o, t),
    "top_k_accuracy": lambda task, o, t: multiclass_accuracy(
        o, t, average="micro", top_k=top_k(task), **_class_kwargs(task)).item(),
    "balanced_accuracy": lambda task, o, t: _quiet(
        multiclass_recall, o, t, average="macro", **_class_kwargs(task)).item(),
    "precision": lambda task, o, t: _quiet(
        multiclass_precision, o, t, average="macro", **_class_kwargs(task)).item(),
    "recall": lambda task, o, t: _quiet(
        multiclass_recall, o, t, average="macro", **_class_kwargs(task)).item(),
    "f1": lambda task, o, t: _quiet(
        multiclass_f1_score, o, t, average="macro", **_class_kwargs(task)).item(),
    "f1_micro": lambda task, o, t: multiclass_f1_score(
        o, t, average="micro", **_class_kwargs(task)).item(),
    "roc_auc": _roc_auc,
    "pr_auc": _pr_auc,
    "log_loss": lambda task, o, t: F.cross_entropy(o, t).item(),
    "kappa": lambda task, o, t: multiclass_cohen_kappa(o, t, **_class_kwargs(task)).item(),
    "quadratic_kappa": lambda task, o, t: multiclass_cohen_kappa(
        o, t, weights="quadratic", **_class_kwargs(task)).item(),
    "ece": lambda task, o, t: multiclass_calibration_error(
        o.softmax(dim=1), t, n_bins=15, **_class_kwargs(task)).item(),
}


# -- multi-label: outputs (N, C) logits, targets (N, C) 0/1 --------------------------------

def _label_kwargs(task: Task) -> dict:
    return {"num_labels": task.n_out, "threshold": task.threshold}


def _multilabel_ranking(function, task, outputs, labels):
    support = labels.sum(dim=0)
    if function is multilabel_auroc:
        support = torch.where(support < len(labels), support, 0)  # needs negatives too
    per_label = _quiet(function, outputs.sigmoid(), labels, num_labels=task.n_out,
                       average=None)
    return _present_mean(per_label, support)


MULTILABEL: dict[str, Metric] = {
    "accuracy": lambda task, o, t: multilabel_accuracy(
        o.sigmoid(), t, average="micro", **_label_kwargs(task)).item(),
    "subset_accuracy": lambda task, o, t: multilabel_exact_match(
        o.sigmoid(), t, **_label_kwargs(task)).item(),
    "hamming_loss": lambda task, o, t: multilabel_hamming_distance(
        o.sigmoid(), t, average="micro", **_label_kwargs(task)).item(),
    "f1": lambda task, o, t: _quiet(
        multilabel_f1_score, o.sigmoid(), t, average="macro", **_label_kwargs(task)).item(),
    "f1_micro": lambda task, o, t: multilabel_f1_score(
        o.sigmoid(), t, average="micro", **_label_kwargs(task)).item(),
    "precision": lambda task, o, t: _quiet(
        multilabel_precision, o.sigmoid(), t, average="macro", **_label_kwargs(task)).item(),
    "recall": lambda task, o, t: _quiet(
        multilabel_recall, o.sigmoid(), t, average="macro", **_label_kwargs(task)).item(),
    "roc_auc": lambda task, o, t: _multilabel_ranking(multilabel_auroc, task, o, t),
    "pr_auc": lambda task, o, t: _multilabel_ranking(multilabel_average_precision, task, o, t),
    "log_loss": lambda task, o, t: F.binary_cross_entropy_with_logits(o, t.float()).item(),
}


# -- regression: outputs and targets (N, T), standardized; metrics in the targets' units --

REGRESSION: dict[str, Metric] = {
    "mae": lambda task, p, a: mean_absolute_error(p, a).item(),
    "rmse": lambda task, p, a: mean_squared_error(p, a, squared=False).item(),
    "r2": lambda task, p, a: (r2_score(p, a, multioutput="uniform_average").item()
                              if len(p) > 1 else float("nan")),
    "mape": lambda task, p, a: mean_absolute_percentage_error(p, a).item(),
}

# Each kind's metrics, by its class: a kind defined by subclassing one (an ordinal
# classification, say) has its parent's unless it is given a table of its own here.
METRICS: dict[type[Task], dict[str, Metric]] = {
    Classification: CLASSIFICATION,
    MultiLabel: MULTILABEL,
    Regression: REGRESSION,
}


def metric_table(task: Task | type[Task]) -> dict[str, Metric]:
    """The metrics of a task (or task class) by name."""
    cls = task if isinstance(task, type) else type(task)
    return next(METRICS[c] for c in cls.__mro__ if c in METRICS)


def available_metrics(task: Task | type[Task]) -> tuple[str, ...]:
    return tuple(metric_table(task))


def compute_metrics(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
                    names: tuple[str, ...] | list[str] | None = None) -> dict[str, float]:
    """The named metrics (default: the task's per-epoch ones) for whole-split ``outputs`` (raw
    model outputs) and ``targets`` (as ``Task.encode_targets`` gives them; soft class targets
    are reduced to their argmax)."""
    registry = metric_table(task)
    names = tuple(names) if names is not None else task.epoch_metrics
    if len(outputs) == 0:
        return {name: float("nan") for name in names}
    outputs, targets = task.metric_inputs(outputs, targets)
    return {name: float(registry[name](task, outputs, targets)) for name in names}


def all_metrics(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Every metric of the task's kind."""
    return compute_metrics(task, outputs, targets, available_metrics(task))


def per_class_metrics(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> list[dict]:
    """Precision, recall, F1 and support of each class (or label), one row each."""
    if not task.has_classes:
        return []
    outputs, targets = task.metric_inputs(outputs, targets)
    if task.single_label:
        kwargs = {"num_classes": task.n_out, "average": None}
        scores = outputs
        functions = (multiclass_precision, multiclass_recall, multiclass_f1_score)
        support = torch.bincount(targets, minlength=task.n_out)
    else:
        kwargs = {"num_labels": task.n_out, "average": None, "threshold": task.threshold}
        scores = outputs.sigmoid()
        functions = (multilabel_precision, multilabel_recall, multilabel_f1_score)
        support = targets.sum(dim=0)
    precision, recall, f1 = (_quiet(f, scores, targets, **kwargs) for f in functions)
    return [{"class": name, "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(task.names)]


def threshold_curve(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
                    grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Macro F1 of multi-label outputs at each threshold of ``grid`` (0.05..0.95)."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2) if grid is None else grid
    outputs, labels = task.metric_inputs(outputs, targets)
    probs = outputs.sigmoid()
    scores = [_quiet(multilabel_f1_score, probs, labels, num_labels=task.n_out,
                     threshold=float(t), average="macro").item() for t in grid]
    return grid, np.asarray(scores)


def best_threshold(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
                   grid: np.ndarray | None = None) -> tuple[float, float]:
    """The multi-label threshold that maximizes macro F1 on (validation) outputs, and that F1."""
    grid, scores = threshold_curve(task, outputs, targets, grid)
    best = int(np.argmax(scores))  # the first of equal scores: the lowest threshold
    return float(grid[best]), float(scores[best])
