"""Metrics of each task kind, computed with torchmetrics from raw outputs and encoded targets."""

from __future__ import annotations

import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multilabel_accuracy,
    multilabel_f1_score,
)

from .tasks import Task


def compute_metrics(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The task's metrics for whole-split ``outputs`` (raw model outputs) and ``targets``
    (as ``Task.encode_targets`` gives them; soft class targets are reduced to their argmax)."""
    outputs = outputs.float().cpu()
    targets = targets.cpu()
    if task.kind == "classification":
        if targets.ndim == 2:
            targets = targets.argmax(dim=1)
        accuracy = multiclass_accuracy(
            outputs, targets, num_classes=task.n_out, average="micro"
        ).item()
        return {"accuracy": accuracy, "error_rate": 1.0 - accuracy}
    if task.kind == "multilabel":
        probs = outputs.sigmoid()
        labels = (targets >= 0.5).int()
        common = dict(num_labels=task.n_out, threshold=task.threshold)
        return {
            "accuracy": multilabel_accuracy(probs, labels, average="micro", **common).item(),
            "f1": multilabel_f1_score(probs, labels, average="macro", **common).item(),
        }
    predicted = task.unscale(outputs)
    actual = task.unscale(targets.float())
    return {
        "mae": mean_absolute_error(predicted, actual).item(),
        "rmse": mean_squared_error(predicted, actual, squared=False).item(),
    }
