"""Interpretation of a model's outputs on a split: where it goes wrong and how sure it is.

``interpret`` takes whole-split raw outputs and encoded targets and writes, into the run's
``plots/`` folder, the confusion matrix (counts and normalized), ROC and PR curves, the
reliability diagram, the top losses as images, and for regression predicted against actual
and the residuals; it returns the tables (per-class metrics, most-confused pairs, top
losses) for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.calibration import calibration_curve
from torchmetrics.functional.classification import (
    binary_precision_recall_curve,
    binary_roc,
    multiclass_confusion_matrix,
    multiclass_precision_recall_curve,
    multiclass_roc,
    multilabel_precision_recall_curve,
    multilabel_roc,
)

from ..metrics import all_metrics, best_threshold, per_class_metrics, threshold_curve
from ..tasks import Task
from .plots import label_text, save_figure, save_image_grid

# Curves of more classes than this become unreadable: the report draws the micro average.
MAX_CURVES = 12
# Confusion matrices of more classes than this lose their numbers.
MAX_ANNOTATED = 20

ImagesFor = Callable[[np.ndarray], torch.Tensor]


def item_losses(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each item's loss: cross-entropy, mean binary cross-entropy over its labels, or the
    absolute error in the targets' units (summed over targets) for regression."""
    return task.item_losses(outputs, targets)


def top_losses(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
               k: int = 16) -> np.ndarray:
    """Positions of the ``k`` items with the largest loss, largest first (ties: earlier)."""
    losses = item_losses(task, outputs, targets).numpy()
    order = np.argsort(-losses, kind="stable")
    return order[:k]


def most_confused(confusion: np.ndarray, names: Sequence[str], limit: int = 10) -> list[dict]:
    """Off-diagonal cells of a confusion matrix (rows actual), largest first."""
    pairs = [(int(confusion[a, p]), a, p) for a in range(len(names))
             for p in range(len(names)) if a != p and confusion[a, p] > 0]
    pairs.sort(key=lambda pair: (-pair[0], pair[1], pair[2]))
    support = confusion.sum(axis=1)
    return [{"actual": names[a], "predicted": names[p], "count": count,
             "share_of_actual": count / support[a] if support[a] else 0.0}
            for count, a, p in pairs[:limit]]


def interpret(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
              images_for: ImagesFor | None,
              plots_dir: Path, paths: Sequence[str] | None = None, split: str = "valid",
              k: int = 16) -> dict:
    """Write the interpretation plots of ``outputs`` against ``targets`` into ``plots_dir``
    and return the tables; ``images_for(positions)`` gives those items' uint8 images
    (N, C, H, W) for the grids, ``paths`` their files when they have them."""
    outputs, targets = outputs.float().cpu(), targets.cpu()
    plots_dir = Path(plots_dir)
    result: dict = {"split": split, "n_images": len(outputs), "plots": []}
    if len(outputs) == 0:
        return result
    if task.chooses_threshold:
        threshold, f1 = best_threshold(task, outputs, targets)
        result["best_threshold"] = {"threshold": threshold, "f1": f1,
                                    "threshold_used": task.threshold}
    result["metrics"] = all_metrics(task, outputs, targets)
    result["per_class"] = per_class_metrics(task, outputs, targets)

    def plot(name: str, title: str, path: Path) -> None:
        result["plots"].append({"name": name, "title": title,
                                "file": f"{plots_dir.name}/{path.name}"})

    if task.single_label:
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets.long()
        confusion = multiclass_confusion_matrix(outputs, labels, task.n_out).numpy()
        result["confusion"] = confusion.tolist()
        result["most_confused"] = most_confused(confusion, task.names)
        plot("confusion", "Confusion matrix",
             save_confusion(confusion, task.names, plots_dir / "confusion.png"))
        plot("curves", "ROC and precision-recall curves (one class against the rest)",
             save_curves(task, outputs, labels, plots_dir / "curves.png"))
        confidence, correct = _confidence(outputs, labels)
        plot("reliability", "Reliability diagram",
             save_reliability(confidence, correct, result["metrics"]["ece"],
                              plots_dir / "reliability.png"))
    elif task.multi_label:
        labels = (targets >= 0.5).int()
        plot("curves", "ROC and precision-recall curves (per label)",
             save_curves(task, outputs, labels, plots_dir / "curves.png"))
        plot("threshold", "Macro F1 against the decision threshold",
             save_threshold_curve(task, outputs, targets, result["best_threshold"],
                                  plots_dir / "threshold.png"))
    else:
        plot("regression", "Predicted against actual, and residuals",
             save_regression(task, outputs, targets, plots_dir / "regression.png"))

    worst = top_losses(task, outputs, targets, k)
    losses = item_losses(task, outputs, targets)
    rows = _describe_items(task, outputs, targets, worst, losses, paths)
    result["top_losses"] = rows
    if len(worst) and images_for is not None:  # None: items that are not images (texts)
        titles = [_grid_title(task, row) for row in rows]
        heading = ("Top losses" if task.has_classes else "Worst predictions") + \
            (": predicted / actual, loss, probability of the prediction"
             if task.single_label else ": predicted / actual, loss")
        grid = save_image_grid(images_for(worst).float() / 255.0, titles,
                               plots_dir / "top_losses.png", title=heading)
        plot("top_losses", f"{heading} ({split} split)", grid)
    return result


def _confidence(outputs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    probs = outputs.softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    return confidence.numpy(), (predicted == labels).numpy()


def _describe_items(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
                    positions: np.ndarray, losses: torch.Tensor,
                    paths: Sequence[str] | None) -> list[dict]:
    rows = []
    activated = task.activate(outputs)
    for position in positions.tolist():
        row: dict = {"position": position, "loss": float(losses[position])}
        if paths is not None:
            row["path"] = str(paths[position])
        row.update(task.describe_item(activated[position], targets[position]))
        rows.append(row)
    return rows


def _grid_title(task: Task, row: dict) -> str:
    if "probability" in row:
        return (f"{_short(row['predicted'])} / {_short(row['actual'])}\n"
                f"loss {row['loss']:.2f} p {row['probability']:.2f}")
    return f"{_short(row['predicted'])} / {_short(row['actual'])}\nloss {row['loss']:.3g}"


def _short(text: str, limit: int = 18) -> str:
    return label_text(text, limit)


# -- plots --------------------------------------------------------------------------------

def save_confusion(confusion: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Counts and row-normalized (recall per actual class) side by side."""
    n = len(names)
    side = min(max(4.0, 0.45 * n + 2), 16)
    figure, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    support = confusion.sum(axis=1, keepdims=True)
    normalized = np.divide(confusion, support, out=np.zeros_like(confusion, dtype=float),
                           where=support > 0)
    for axis, matrix, title, fmt in ((axes[0], confusion, "counts", "d"),
                                     (axes[1], normalized, "normalized by actual class",
                                      ".2f")):
        axis.imshow(matrix, cmap="Blues")
        axis.set_title(title)
        axis.set_xlabel("predicted")
        axis.set_ylabel("actual")
        if n <= 40:
            labels = [_short(str(name), 14) for name in names]
            axis.set_xticks(range(n), labels, rotation=90, fontsize=8)
            axis.set_yticks(range(n), labels, fontsize=8)
        if n <= MAX_ANNOTATED:
            top = matrix.max() or 1
            for a in range(n):
                for p in range(n):
                    value = matrix[a, p]
                    axis.text(p, a, format(value, fmt), ha="center", va="center", fontsize=7,
                              color="white" if value > top / 2 else "black")
    return save_figure(figure, path)


def save_curves(task: Task, outputs: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    """ROC and precision-recall curves per class (micro average beyond MAX_CURVES)."""
    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    if task.single_label:
        probs = outputs.softmax(dim=1)
        onehot = F.one_hot(labels, task.n_out)
        roc = multiclass_roc(probs, labels, task.n_out)
        pr = multiclass_precision_recall_curve(probs, labels, task.n_out)
    else:
        probs = outputs.sigmoid()
        onehot = labels
        roc = multilabel_roc(probs, labels, task.n_out)
        pr = multilabel_precision_recall_curve(probs, labels, task.n_out)
    if task.n_out <= MAX_CURVES:
        for i, name in enumerate(task.names):
            if onehot[:, i].sum() == 0:
                continue
            roc_axis.plot(roc[0][i].numpy(), roc[1][i].numpy(), label=_short(str(name)))
            pr_axis.plot(pr[1][i].numpy(), pr[0][i].numpy(), label=_short(str(name)))
        roc_axis.legend(fontsize=7, loc="lower right")
    else:
        flat_probs, flat_labels = probs.flatten(), onehot.flatten()
        fpr, tpr, _ = binary_roc(flat_probs, flat_labels)
        precision, recall, _ = binary_precision_recall_curve(flat_probs, flat_labels)
        roc_axis.plot(fpr.numpy(), tpr.numpy(), label=f"micro average of {task.n_out}")
        pr_axis.plot(recall.numpy(), precision.numpy(), label=f"micro average of {task.n_out}")
        roc_axis.legend(fontsize=8)
    roc_axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_axis.set(xlabel="recall", ylabel="precision", title="precision-recall",
                ylim=(0, 1.02))
    return save_figure(figure, path)


def save_reliability(confidence: np.ndarray, correct: np.ndarray, ece: float, path: Path,
                     n_bins: int = 15) -> Path:
    """Accuracy against confidence of the predicted class, with the expected calibration
    error; a well-calibrated model lies on the diagonal."""
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
    accuracy, mean_confidence = calibration_curve(correct.astype(int), confidence,
                                                  n_bins=n_bins, strategy="uniform")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    axis.plot(mean_confidence, accuracy, "o-", label="model")
    axis.set(ylabel="accuracy", title=f"reliability (ECE {ece:.3f})", xlim=(0, 1),
             ylim=(0, 1.02))
    axis.legend(loc="upper left")
    counts.hist(confidence, bins=n_bins, range=(0, 1), color="tab:grey")
    counts.set(xlabel="confidence of the predicted class", ylabel="images")
    return save_figure(figure, path)


def save_threshold_curve(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
                         best: dict, path: Path) -> Path:
    grid, scores = threshold_curve(task, outputs, targets)
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    axis.plot(grid, scores)
    axis.axvline(best["threshold"], color="tab:green", linestyle="--",
                 label=f"best {best['threshold']:.2f} (F1 {best['f1']:.3f})")
    axis.set(xlabel="threshold", ylabel="macro F1", title="threshold")
    axis.legend()
    return save_figure(figure, path)


def save_regression(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
                    path: Path) -> Path:
    """Predicted against actual (per target) and the residual histogram."""
    predicted = task.unscale(outputs.reshape(len(outputs), -1)).numpy()
    actual = task.unscale(targets.float().reshape(len(targets), -1)).numpy()
    figure, (scatter, residuals) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, name in enumerate(task.names):
        scatter.scatter(actual[:, i], predicted[:, i], s=8, alpha=0.5, label=_short(str(name)))
        residuals.hist(predicted[:, i] - actual[:, i], bins=40, alpha=0.6,
                       label=_short(str(name)))
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(),
                                                                      predicted.max()))
    scatter.plot([low, high], [low, high], color="grey", linestyle=":")
    scatter.set(xlabel="actual", ylabel="predicted", title="predicted against actual")
    residuals.set(xlabel="predicted - actual", ylabel="images", title="residuals")
    if len(task.names) > 1:
        scatter.legend(fontsize=7)
    return save_figure(figure, path)
