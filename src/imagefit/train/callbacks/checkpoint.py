"""Checkpoints kept during training."""

from __future__ import annotations

from pathlib import Path

from ... import runs
from .base import Callback


class SnapshotSaver(Callback):
    """Saves the model at the end of every SGDR cycle to checkpoints/snapshot_K (a model
    directory each), for snapshot ensembles."""

    order = 25

    def __init__(self, run_dir: Path, model_info: dict, cycle_ends: list[int]) -> None:
        self.folder = Path(run_dir) / "checkpoints"
        self.model_info = model_info
        self.cycle_ends = list(cycle_ends)

    def after_epoch(self, learner) -> None:
        epochs_done = learner.epoch + 1
        if epochs_done in self.cycle_ends:
            cycle = self.cycle_ends.index(epochs_done) + 1
            target = self.folder / f"snapshot_{cycle}"
            target.mkdir(parents=True, exist_ok=True)
            runs.save_model(target, learner.model, {**self.model_info,
                                                    "epochs_trained": epochs_done})
