"""The built-in task kinds: one class each, registered under its name by subclassing."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .base import Task


class Classification(Task, kind="classification"):
    """One class per image: softmax over the classes, cross-entropy (with label smoothing)."""

    losses: ClassVar[tuple[str, ...]] = ("cross_entropy",)
    single_label: ClassVar[bool] = True
    default_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "error_rate")
    main_metric: ClassVar[str] = "accuracy"
    searched: ClassVar[tuple[str, ...]] = ("lr", "wd", "label_smoothing", "mixup")
    noun: ClassVar[str] = "class"

    def label_matrix(self, targets):
        indices = np.asarray(targets, dtype=np.int64).reshape(-1)
        return np.arange(self.n_out) == indices[:, None]

    def label_text(self, target):
        return self.names[int(np.ravel(target)[0])]

    def output_meaning(self):
        return f"probability of each class: {', '.join(self.names)}"

    def metric_inputs(self, outputs, targets):
        targets = targets.cpu()
        if targets.ndim == 2:  # soft targets: judged against their most likely class
            targets = targets.argmax(dim=1)
        return outputs.float().cpu(), targets.long()

    def encode_targets(self, targets: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.array(targets, dtype=np.int64))

    def loss(self, outputs, targets, *, weighted=False):
        weight = self._weight_tensor(outputs) if weighted else None
        return F.cross_entropy(outputs, targets, weight=weight,
                               label_smoothing=self.label_smoothing)

    def activate(self, outputs):
        return outputs.float().softmax(dim=1)

    def decode(self, activated):
        return [self.names[i] for i in activated.argmax(dim=1).tolist()]

    def from_average(self, averaged):
        return averaged.clamp_min(1e-12).log()  # log-probabilities: their softmax is it

    def item_losses(self, outputs, targets):
        if targets.ndim == 2:  # soft targets: judged against their most likely class
            targets = targets.argmax(dim=1)
        return F.cross_entropy(outputs.float(), targets.long(), reduction="none")

    def describe_item(self, activated, target):
        actual = int(target.argmax()) if target.ndim else int(target)
        predicted = int(activated.argmax())
        return {"predicted": self.names[predicted], "actual": self.names[actual],
                "probability": float(activated[predicted]),
                "probability_actual": float(activated[actual])}

    def describe_targets(self, targets):
        if targets.ndim == 1:
            return [self.names[i] for i in targets.tolist()]
        labels = []
        for row in targets.float().tolist():  # mixed: the two largest shares
            ranked = sorted(zip(row, self.names), reverse=True)
            labels.append(" / ".join(f"{w:.2f} {n}" if w < 0.99 else n
                                     for w, n in ranked[:2] if w > 0.01))
        return labels


class MultiLabel(Task, kind="multilabel"):
    """Any number of labels per image: a sigmoid per label, binary cross-entropy, and the
    decision threshold chosen on validation."""

    multi_label: ClassVar[bool] = True
    chooses_threshold: ClassVar[bool] = True
    losses: ClassVar[tuple[str, ...]] = ("bce",)
    default_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "f1")
    main_metric: ClassVar[str] = "f1"
    searched: ClassVar[tuple[str, ...]] = ("lr", "wd", "mixup")
    noun: ClassVar[str] = "label"

    def label_matrix(self, targets):
        return np.asarray(targets, dtype=np.float32).reshape(len(targets), -1) > 0.5

    def label_text(self, target):
        return ";".join(n for n, v in zip(self.names, np.ravel(target)) if v)

    def output_meaning(self):
        return (f"probability of each label: {', '.join(self.names)} (threshold "
                f"{self.threshold:g})")

    def metric_inputs(self, outputs, targets):
        return outputs.float().cpu(), (targets.cpu() >= 0.5).int()

    def loss(self, outputs, targets, *, weighted=False):
        weight = self._weight_tensor(outputs) if weighted else None
        return F.binary_cross_entropy_with_logits(outputs, targets, pos_weight=weight)

    def activate(self, outputs):
        return outputs.float().sigmoid()

    def decode(self, activated):
        chosen = (activated >= self.threshold).tolist()
        return [";".join(n for n, c in zip(self.names, row) if c) for row in chosen]

    def from_average(self, averaged):
        return torch.logit(averaged, eps=1e-6)

    def item_losses(self, outputs, targets):
        return F.binary_cross_entropy_with_logits(outputs.float(), targets.float(),
                                                  reduction="none").mean(dim=1)

    def describe_item(self, activated, target):
        chosen = [n for n, p in zip(self.names, activated.tolist()) if p >= self.threshold]
        actual = [n for n, t in zip(self.names, target.tolist()) if t >= 0.5]
        return {"predicted": ";".join(chosen) or "(none)", "actual": ";".join(actual) or "(none)"}

    def describe_targets(self, targets):
        labels = []
        for row in targets.float().tolist():
            ranked = sorted(zip(row, self.names), reverse=True)
            labels.append(";".join(f"{n}" if w >= 0.99 else f"{w:.2f} {n}"
                                   for w, n in ranked if w > 0.01) or "(none)")
        return labels

    def prediction_columns(self, activated, style):
        columns = super().prediction_columns(activated, style)
        if "label" in columns:
            labels = columns.pop("label")
            if style == "kaggle-label":  # Kaggle's multi-label convention: space-separated
                labels = [text.replace(";", " ") for text in labels]
            columns = {"labels": labels, **columns}
        return columns


class Regression(Task, kind="regression"):
    """One or more values per image, standardized inside and reported in their own units."""

    has_classes: ClassVar[bool] = False
    losses: ClassVar[tuple[str, ...]] = ("mse", "l1", "huber")
    default_metrics: ClassVar[tuple[str, ...]] = ("mae", "rmse")
    main_metric: ClassVar[str] = "mae"

    def fit_target_scaling(self, train_targets):
        values = np.asarray(train_targets, dtype=np.float64).reshape(len(train_targets), -1)
        std = values.std(axis=0)
        self.target_mean = values.mean(axis=0).tolist()
        self.target_std = np.where(std > 0, std, 1.0).tolist()

    def encode_targets(self, targets):
        values = super().encode_targets(targets)
        if self.target_mean:
            mean = torch.tensor(self.target_mean, dtype=torch.float32)
            std = torch.tensor(self.target_std, dtype=torch.float32)
            values = (values - mean) / std
        return values

    def loss(self, outputs, targets, *, weighted=False):
        losses = {"l1": F.l1_loss, "huber": F.huber_loss}
        return losses.get(self.regression_loss, F.mse_loss)(outputs, targets)

    def activate(self, outputs):
        return self.unscale(outputs.float())

    def decode(self, activated):
        return activated.cpu().numpy()

    def averageable(self, raw):
        return raw

    def item_losses(self, outputs, targets):
        """The absolute error in the targets' units, summed over the targets."""
        predicted = self.unscale(outputs.float().reshape(len(outputs), -1))
        actual = self.unscale(targets.float().reshape(len(targets), -1))
        return (predicted - actual).abs().sum(dim=1)

    def describe_item(self, activated, target):
        actual = self.unscale(target.float().reshape(1, -1))[0]
        return {"predicted": ", ".join(f"{v:.4g}" for v in activated.tolist()),
                "actual": ", ".join(f"{v:.4g}" for v in actual.tolist())}

    def from_average(self, averaged):
        return averaged

    def describe_targets(self, targets):
        values = self.unscale(targets.float().reshape(len(targets), -1))
        return [", ".join(f"{v:.3g}" for v in row) for row in values.tolist()]

    def default_targets(self, outputs):
        return torch.zeros(len(outputs), dtype=torch.int64)  # the first target

    def describe_output(self, values, target):
        return f"{self.names[target]} = {values[target].item():.3g}"

    def prediction_columns(self, activated, style):
        return {name: activated[:, i].numpy() for i, name in enumerate(self.names)}
