"""What is being learned: one class per task kind holds what differs between them (loss,
activation, decoding, target encoding, how test-time augmentation averages, what a grid or a
saliency map shows, which metric tells a better model), so the rest of the package asks the
task instead of branching on its kind.

Targets arrive as numpy arrays in the shape their kind expects:
classification: int64 class indices (N,); multilabel: float32 0/1 (N, C);
regression: float32 values in their own units (N, T).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

TaskKind = Literal["classification", "multilabel", "regression"]
TASK_KINDS: tuple[str, ...] = ("classification", "multilabel", "regression")

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "error_rate"),
    "multilabel": ("accuracy", "f1"),
    "regression": ("mae", "rmse"),
}
# The metric that tells a better model.
MAIN_METRIC: dict[str, str] = {
    "classification": "accuracy",
    "multilabel": "f1",
    "regression": "mae",
}
HIGHER_IS_BETTER = {
    "accuracy": True, "error_rate": False, "top_k_accuracy": True, "balanced_accuracy": True,
    "precision": True, "recall": True, "f1": True, "f1_micro": True, "roc_auc": True,
    "pr_auc": True, "log_loss": False, "kappa": True, "quadratic_kappa": True, "ece": False,
    "subset_accuracy": True, "hamming_loss": False, "mae": False, "rmse": False, "r2": True,
    "mape": False, "loss": False,
}


@dataclass
class Task:
    """A task kind with its class or target names; ``Task(kind, names, ...)`` makes the
    kind's own class (``Classification``, ``MultiLabel`` or ``Regression``).

    Regression targets are standardized inside (``target_mean``/``target_std``, computed from
    the training split) so that one learning rate suits targets of any scale; outputs and
    metrics are reported in the targets' own units. ``class_weights`` (from the training
    targets, see ``data.sampling.class_weights``) weigh the training loss: cross-entropy's
    per-class weight, or the multi-label ``pos_weight``.
    """

    kind: TaskKind
    names: list[str]
    regression_loss: Literal["mse", "l1", "huber"] = "mse"
    threshold: float = 0.5
    label_smoothing: float = 0.0
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    class_weights: list[float] = field(default_factory=list)
    _weight_tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    has_classes: ClassVar[bool] = True  # outputs are classes or labels (not values)
    single_label: ClassVar[bool] = False  # exactly one class per image (targets are indices)
    chooses_threshold: ClassVar[bool] = False  # a decision threshold is chosen on validation
    losses: ClassVar[tuple[str, ...]] = ()  # the --loss values it trains with, default first

    def __new__(cls, kind: str | None = None, *args, **kwargs):
        if cls is Task:
            if kind not in KINDS:
                raise ValueError(f"unknown task kind {kind!r}: one of {', '.join(KINDS)}")
            cls = KINDS[kind]
        return super().__new__(cls)

    @property
    def n_out(self) -> int:
        return len(self.names)

    @property
    def main_metric(self) -> str:
        return MAIN_METRIC[self.kind]

    @property
    def epoch_metrics(self) -> tuple[str, ...]:
        """The metrics shown per epoch: those chosen with --metrics, else the defaults."""
        return tuple(self.metrics) or DEFAULT_METRICS[self.kind]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("loss", *self.epoch_metrics)

    def fit_target_scaling(self, train_targets: np.ndarray) -> None:
        """Record the training targets' mean and std (regression only)."""

    def encode_targets(self, targets: np.ndarray) -> torch.Tensor:
        """Targets as the tensor the loss expects."""
        return torch.as_tensor(np.asarray(targets, dtype=np.float32)).reshape(len(targets), -1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, *,
             weighted: bool = False) -> torch.Tensor:
        """Mean loss of a batch; classification targets may be indices or soft probabilities.

        ``weighted`` applies ``class_weights``: training asks for it, evaluation does not, so
        that validation losses stay comparable between runs with and without weights.
        """
        raise NotImplementedError

    def _weight_tensor(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """``class_weights`` on the outputs' device and dtype, made once (not copied to the
        device at every step)."""
        if not self.class_weights:
            return None
        key = (outputs.device, outputs.dtype)
        if key not in self._weight_tensors:
            self._weight_tensors[key] = torch.tensor(self.class_weights, dtype=outputs.dtype,
                                                     device=outputs.device)
        return self._weight_tensors[key]

    def activate(self, outputs: torch.Tensor) -> torch.Tensor:
        """Raw model outputs to probabilities (classes, labels) or values in own units."""
        raise NotImplementedError

    def unscale(self, values: torch.Tensor) -> torch.Tensor:
        """Standardized regression values back to the targets' units."""
        if not self.target_mean:
            return values
        mean = torch.tensor(self.target_mean, dtype=values.dtype, device=values.device)
        std = torch.tensor(self.target_std, dtype=values.dtype, device=values.device)
        return values * std + mean

    def decode(self, activated: torch.Tensor) -> list[str] | np.ndarray:
        """Activated outputs to labels: a class name, ';'-joined names, or the values."""
        raise NotImplementedError

    def averageable(self, raw: torch.Tensor) -> torch.Tensor:
        """What test-time augmentation and ensembles average: probabilities for classes and
        labels, the outputs themselves for regression."""
        return self.activate(raw)

    def from_average(self, averaged: torch.Tensor) -> torch.Tensor:
        """An average of ``averageable`` values back to raw outputs, which the loss and the
        metrics take."""
        raise NotImplementedError

    def describe_targets(self, targets: torch.Tensor) -> list[str]:
        """Short labels of encoded (possibly mixed) targets, for a grid of images."""
        raise NotImplementedError

    def default_targets(self, outputs: torch.Tensor) -> torch.Tensor:
        """The output a saliency map explains per image: the most probable class (label)."""
        return outputs.argmax(dim=1).cpu()

    def describe_output(self, values: torch.Tensor, target: int) -> str:
        """A saliency map's title: the prediction and its probability, and the explained
        class when it is another (``values``: one image's activated outputs)."""
        predicted = int(values.argmax())
        title = f"{self.names[predicted]} {values[predicted].item():.0%}"
        if target != predicted:
            title += f"\nexplaining {self.names[target]} {values[target].item():.0%}"
        return title

    def prediction_columns(self, activated: torch.Tensor, style: str) -> dict[str, object]:
        """The columns ``predict`` writes: ``style`` is table (label(s) and prob_ columns),
        kaggle (a column per class) or kaggle-label (the label(s) only)."""
        label = "label"
        columns: dict[str, object] = {}
        if style != "kaggle":
            columns[label] = self.decode(activated)
        if style == "kaggle-label":
            return columns
        prefix = "" if style == "kaggle" else "prob_"
        for i, name in enumerate(self.names):
            columns[f"{prefix}{name}"] = activated[:, i].numpy()
        return columns

    def item_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each item's own loss (unweighted), to rank the worst predictions."""
        raise NotImplementedError

    def describe_item(self, activated: torch.Tensor, target: torch.Tensor) -> dict:
        """One item's prediction and truth as text (``activated``: its activated outputs,
        ``target``: its encoded target), for the table of the worst predictions."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "names": list(self.names),
            "regression_loss": self.regression_loss,
            "threshold": self.threshold,
            "label_smoothing": self.label_smoothing,
            "target_mean": list(self.target_mean),
            "target_std": list(self.target_std),
            "metrics": list(self.metrics),
            "class_weights": list(self.class_weights),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Task:
        """A task from ``to_dict``'s mapping; keys added since (e.g. ``class_weights`` in
        older model.json files) take their defaults, and unknown ones are left out."""
        return Task(**{k: v for k, v in data.items()
                       if k in Task.__dataclass_fields__ and not k.startswith("_")})


class Classification(Task):
    """One class per image: softmax over the classes, cross-entropy (with label smoothing)."""

    losses: ClassVar[tuple[str, ...]] = ("cross_entropy",)
    single_label: ClassVar[bool] = True

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


class MultiLabel(Task):
    """Any number of labels per image: a sigmoid per label, binary cross-entropy, and the
    decision threshold chosen on validation."""

    chooses_threshold: ClassVar[bool] = True
    losses: ClassVar[tuple[str, ...]] = ("bce",)

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


class Regression(Task):
    """One or more values per image, standardized inside and reported in their own units."""

    has_classes: ClassVar[bool] = False
    losses: ClassVar[tuple[str, ...]] = ("mse", "l1", "huber")

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


KINDS: dict[str, type[Task]] = {"classification": Classification, "multilabel": MultiLabel,
                                "regression": Regression}


def resolve_loss(kind: str, loss: str) -> str:
    """The loss a ``kind`` task trains with for ``--loss`` (``auto``: its own)."""
    losses = KINDS[kind].losses
    if loss == "auto":
        return losses[0]
    if loss not in losses:
        raise ValueError(f"{loss} does not train {kind}: give --loss "
                         f"{' or '.join(losses)} (or auto)")
    return loss
