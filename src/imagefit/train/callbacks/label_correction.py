"""Progressive label correction (PLC, Zhang et al., ICLR 2021): after a warm-up on the given
labels, a stored training label that the model contradicts with a probability margin above
``theta`` is replaced by the model's class; ``theta`` falls as training goes on, so the
corrections start with the clearest cases."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from ... import runs
from ...errors import ImagefitError
from .. import schedules
from .base import Callback

ThetaSchedule = Literal["linear", "cosine", "step"]
CORRECTED_LABELS = "corrected_labels.csv"


def theta_schedule(start: float, end: float, shape: ThetaSchedule) -> Callable[[float], float]:
    """``theta`` over the post-warm-up part of training (0..1): straight from ``start`` to
    ``end``, along a half cosine, or ``start`` for the first half and ``end`` after."""
    if shape == "linear":
        return lambda p: start + (end - start) * min(max(p, 0.0), 1.0)
    if shape == "cosine":
        return schedules.cosine(start, end)
    if shape == "step":
        return schedules.joined(schedules.constant(start), schedules.constant(end), 0.5)
    raise ValueError(f"unknown theta schedule {shape!r}")


def check_label_correction(task, pipeline) -> None:
    """Refuse what PLC cannot work with: labels that are not single classes, mixed targets."""
    if not task.single_label:
        raise ImagefitError("--plc corrects class labels: it needs single-label classification")
    if pipeline.mix.active:
        raise ImagefitError("--plc needs unmixed batches: turn off mixup/cutmix (e.g. "
                            "--augment-options '{\"mixup\": 0, \"cutmix\": 0}')")


class ProgressiveLabelCorrection(Callback):
    """Corrects the training loader's stored labels (``train_loader.targets``, which later
    epochs read) from the predictions on each training batch once ``warmup`` of the fit's
    steps are done; fits with frozen layers only warm up. Each epoch row gets
    ``plc_changed`` (labels changed in that epoch); with ``run_dir``, corrected_labels.csv
    there lists every row whose label now differs from the original (``paths``: the
    table's image paths, when it has them), and a resumed fit starts from it."""

    order = 5  # before the progress line and the run writer read the epoch's row

    def __init__(self, warmup: float = 0.2, theta_start: float = 0.3, theta_end: float = 0.1,
                 schedule: ThetaSchedule = "linear", run_dir: Path | None = None,
                 paths: Sequence[str] | None = None) -> None:
        self.warmup = warmup
        self.theta = theta_schedule(theta_start, theta_end, schedule)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.paths = paths
        self.original: torch.Tensor | None = None  # the labels before any correction
        self.changed = 0  # labels changed since the last epoch row
        self.frozen = False

    def theta_at(self, progress: float) -> float | None:
        """The margin at ``progress`` (0..1) through the fit; None during the warm-up."""
        if progress < self.warmup or self.warmup >= 1:
            return None
        return self.theta((progress - self.warmup) / (1 - self.warmup))

    def before_fit(self, learner) -> None:
        check_label_correction(learner.task, learner.pipeline)
        self._keep_original(learner)
        self.frozen = not all(p.requires_grad for p in learner.model.parameters())

    @torch.no_grad()
    def after_batch(self, learner) -> None:
        theta = self.theta_at(learner.progress)
        if theta is None or self.frozen:
            return
        targets = learner.train_loader.targets
        rows = learner.train_loader.batch_rows
        probabilities = learner.outputs.detach().float().softmax(dim=1)
        labels = targets[rows].to(probabilities.device)
        predicted_p, predicted = probabilities.max(dim=1)
        label_p = probabilities.gather(1, labels[:, None]).squeeze(1)
        wrong = (predicted != labels) & (predicted_p - label_p > theta)
        if wrong.any():
            targets[rows[wrong.cpu()]] = predicted[wrong].to(targets.device, targets.dtype)
            self.changed += int(wrong.sum())

    def after_epoch(self, learner) -> None:
        self._keep_original(learner)  # head training on precomputed features has no fit
        learner.history[-1]["plc_changed"] = self.changed
        self.changed = 0
        if self.run_dir is not None:
            self.write_corrections(learner)

    def write_corrections(self, learner) -> Path:
        """corrected_labels.csv in ``run_dir`` (atomically): row, path, original, corrected."""
        names = learner.task.names
        current = learner.train_loader.targets
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["row", *(["path"] if self.paths is not None else []), "original",
                         "corrected"])
        for row in torch.nonzero(current != self.original).flatten().tolist():
            writer.writerow([row, *([self.paths[row]] if self.paths is not None else []),
                             names[int(self.original[row])], names[int(current[row])]])
        path = self.run_dir / CORRECTED_LABELS
        runs.write_atomic(path, text.getvalue())
        return path

    def _keep_original(self, learner) -> None:
        if self.original is not None:
            return
        targets = learner.train_loader.targets
        self.original = targets.clone()
        saved = None if self.run_dir is None else self.run_dir / CORRECTED_LABELS
        if saved is not None and saved.is_file():  # resuming: take up the corrections so far
            index = {name: i for i, name in enumerate(learner.task.names)}
            with open(saved, newline="") as lines:
                for entry in csv.DictReader(lines):
                    targets[int(entry["row"])] = index[entry["corrected"]]
