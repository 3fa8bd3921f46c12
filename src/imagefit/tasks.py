"""What is being learned: the head size, loss, output activation and decoding of each task kind.

Targets arrive as numpy arrays in the shape their kind expects:
classification: int64 class indices (N,); multilabel: float32 0/1 (N, C);
regression: float32 values in their own units (N, T).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    """A task kind with its class or target names.

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
        if self.kind != "regression":
            return
        values = np.asarray(train_targets, dtype=np.float64).reshape(len(train_targets), -1)
        std = values.std(axis=0)
        self.target_mean = values.mean(axis=0).tolist()
        self.target_std = np.where(std > 0, std, 1.0).tolist()

    def encode_targets(self, targets: np.ndarray) -> torch.Tensor:
        """Targets as the tensor the loss expects."""
        if self.kind == "classification":
            return torch.as_tensor(np.array(targets, dtype=np.int64))
        values = torch.as_tensor(np.asarray(targets, dtype=np.float32)).reshape(len(targets), -1)
        if self.kind == "regression" and self.target_mean:
            mean = torch.tensor(self.target_mean, dtype=torch.float32)
            std = torch.tensor(self.target_std, dtype=torch.float32)
            values = (values - mean) / std
        return values

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, *,
             weighted: bool = False) -> torch.Tensor:
        """Mean loss of a batch; classification targets may be indices or soft probabilities.

        ``weighted`` applies ``class_weights``: training asks for it, evaluation does not, so
        that validation losses stay comparable between runs with and without weights.
        """
        weight = self._weight_tensor(outputs) if weighted else None
        if self.kind == "classification":
            return F.cross_entropy(outputs, targets, weight=weight,
                                   label_smoothing=self.label_smoothing)
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(outputs, targets, pos_weight=weight)
        if self.regression_loss == "l1":
            return F.l1_loss(outputs, targets)
        if self.regression_loss == "huber":
            return F.huber_loss(outputs, targets)
        return F.mse_loss(outputs, targets)

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
        """Raw model outputs to probabilities (classification) or values in own units."""
        if self.kind == "classification":
            return outputs.float().softmax(dim=1)
        if self.kind == "multilabel":
            return outputs.float().sigmoid()
        return self.unscale(outputs.float())

    def unscale(self, values: torch.Tensor) -> torch.Tensor:
        """Standardized regression values back to the targets' units."""
        if not self.target_mean:
            return values
        mean = torch.tensor(self.target_mean, dtype=values.dtype, device=values.device)
        std = torch.tensor(self.target_std, dtype=values.dtype, device=values.device)
        return values * std + mean

    def decode(self, activated: torch.Tensor) -> list[str] | np.ndarray:
        """Activated outputs to labels: a class name, ';'-joined names, or the values."""
        if self.kind == "classification":
            return [self.names[i] for i in activated.argmax(dim=1).tolist()]
        if self.kind == "multilabel":
            chosen = (activated >= self.threshold).tolist()
            return [";".join(n for n, c in zip(self.names, row) if c) for row in chosen]
        return activated.cpu().numpy()

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
        older model.json files) take their defaults."""
        return cls(**data)
