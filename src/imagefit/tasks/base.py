"""What is being learned: one class per task kind holds what differs between them (loss,
activation, decoding, target encoding, how test-time augmentation averages, what a grid or a
saliency map shows, which metric tells a better model), so the rest of the package asks the
task instead of branching on its kind. The kinds themselves are in ``tasks.kinds``; a kind
defined elsewhere registers itself by subclassing (``Task.__init_subclass__``).

Targets arrive as numpy arrays in the shape their kind expects:
classification: int64 class indices (N,); multilabel: float32 0/1 (N, C);
regression: float32 values in their own units (N, T).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch

from ..errors import ImagefitError

HIGHER_IS_BETTER = {
    "accuracy": True, "error_rate": False, "top_k_accuracy": True, "balanced_accuracy": True,
    "precision": True, "recall": True, "f1": True, "f1_micro": True, "roc_auc": True,
    "pr_auc": True, "log_loss": False, "kappa": True, "quadratic_kappa": True, "ece": False,
    "subset_accuracy": True, "hamming_loss": False, "mae": False, "rmse": False, "r2": True,
    "mape": False, "loss": False,
}

# Every task kind by name, in the order defined (``tasks.kinds`` registers the built-in ones).
KINDS: dict[str, type[Task]] = {}


def task_class(kind: str | None) -> type[Task]:
    """The class of a task kind named in options, a model's files or a run's; an unknown
    name is an error (never taken for another kind)."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}: one of {', '.join(KINDS)}")
    return KINDS[kind]


def resolve_loss(kind: str, loss: str) -> str:
    """The loss a ``kind`` task trains with for ``--loss`` (``auto``: its own)."""
    losses = task_class(kind).losses
    if loss == "auto":
        return losses[0]
    if loss not in losses:
        raise ValueError(f"{loss} does not train {kind}: give --loss "
                         f"{' or '.join(losses)} (or auto)")
    return loss


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

    kind: str
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
    multi_label: ClassVar[bool] = False  # any number of labels per image (0/1 targets)
    chooses_threshold: ClassVar[bool] = False  # a decision threshold is chosen on validation
    losses: ClassVar[tuple[str, ...]] = ()  # the --loss values it trains with, default first
    default_metrics: ClassVar[tuple[str, ...]] = ()  # shown per epoch unless --metrics
    main_metric: ClassVar[str] = ""  # the metric that tells a better model
    searched: ClassVar[tuple[str, ...]] = ("lr", "wd")  # what `tune` searches by default
    noun: ClassVar[str] = "target"  # what one of ``names`` is: class, label or target

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        """``class Ordinal(Classification, kind="ordinal")`` registers a kind: ``Task("ordinal",
        names)`` makes one, and a model saved with it loads again."""
        super().__init_subclass__(**kwargs)
        if kind is not None:
            KINDS[kind] = cls

    def __new__(cls, kind: str | None = None, *args, **kwargs):
        if cls is Task:
            cls = task_class(kind)
        return super().__new__(cls)

    @property
    def n_out(self) -> int:
        return len(self.names)

    @property
    def epoch_metrics(self) -> tuple[str, ...]:
        """The metrics shown per epoch: those chosen with --metrics, else the defaults."""
        return tuple(self.metrics) or self.default_metrics

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("loss", *self.epoch_metrics)

    def label_matrix(self, targets: np.ndarray) -> np.ndarray:
        """(N, C) booleans: which classes (labels) each row carries, the one form in which
        sampling, class weights, soft labels and the data's summaries count them."""
        raise ImagefitError(f"{self.kind} targets have no classes: the option needs "
                            "classification or multi-label data")

    def label_text(self, target: np.ndarray) -> str:
        """One row's target as the user wrote it: a class, ';'-joined labels, the values."""
        return ", ".join(f"{v:g}" for v in np.ravel(target))

    def output_meaning(self) -> str:
        """What the model's outputs are, in a sentence (an exported model's description)."""
        return f"predicted values in the targets' units: {', '.join(self.names)}"

    def metric_inputs(self, outputs: torch.Tensor,
                      targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-split raw outputs and encoded targets as the kind's metrics take them."""
        values = outputs.float().cpu().reshape(len(outputs), -1)
        actual = targets.cpu().float().reshape(len(targets), -1)
        return self.unscale(values), self.unscale(actual)

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
