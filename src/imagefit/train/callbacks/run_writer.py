"""Keeps the run directory current after every epoch, so an interrupted fit keeps the last
finished epoch's model and metrics."""

from __future__ import annotations

from pathlib import Path

from ... import runs
from .base import Callback


class RunWriter(Callback):
    """Appends the epoch's row to metrics.csv, saves the model with its description and the
    training checkpoint that ``--resume`` continues from; ``epochs_saved`` counts the epochs
    whose row, model and checkpoint are all on disk."""

    order = 20

    def __init__(self, run_dir: Path, model_info: dict) -> None:
        self.run_dir = Path(run_dir)
        self.model_info = model_info
        self.epochs_saved = 0

    def after_epoch(self, learner) -> None:
        # the row last: once metrics.csv shows an epoch, its model and checkpoint are on disk
        # (a kill -9 in between leaves a checkpoint ahead of metrics.csv, which resuming
        # rewrites from the checkpoint)
        with runs.interrupts_deferred():
            runs.save_model(self.run_dir, learner.eval_model,
                            {**self.model_info, "epochs_trained": len(learner.history)})
            if learner.optimizer is not None:  # head training on precomputed features
                runs.save_checkpoint(self.run_dir, learner.checkpoint_state())  # has none
            runs.append_metrics_row(self.run_dir, learner.history[-1])
            self.epochs_saved = len(learner.history)
