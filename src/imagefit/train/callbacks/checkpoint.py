"""Checkpoints kept during training."""

from __future__ import annotations

from pathlib import Path

from ... import run_records, runs
from .base import Callback


class SnapshotSaver(Callback):
    """Saves the model at the end of every SGDR cycle to checkpoints/snapshot_K (a model
    directory each), for snapshot ensembles. Cycles end at fixed fractions of the fit
    (``cycle_ends`` in epochs over the last one), so a --budget fit's planned length moves
    them with it."""

    order = 25

    def __init__(self, run_dir: Path, model_info: dict, cycle_ends: list[int]) -> None:
        self.folder = Path(run_dir) / "checkpoints"
        self.model_info = model_info
        self.bounds = [end / cycle_ends[-1] for end in cycle_ends]
        self.saved = 0

    def before_fit(self, learner) -> None:
        self.saved = sum(bound <= learner.progress_at(learner.step) + 1e-9
                         for bound in self.bounds) if learner.step else 0

    def after_batch(self, learner) -> None:
        while self.saved < len(self.bounds) and \
                learner.progress_at(learner.step) >= self.bounds[self.saved] - 1e-9:
            self.saved += 1
            target = self.folder / f"snapshot_{self.saved}"
            target.mkdir(parents=True, exist_ok=True)
            epochs = learner.step / max(len(learner.train_loader), 1)
            epochs = int(epochs) if epochs.is_integer() else round(epochs, 3)
            runs.save_model(target, learner.eval_model, {**self.model_info,
                                                         "epochs_trained": epochs})


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class Patience(Callback):
    """Watches ``monitor`` after every epoch and calls ``exhausted`` when it has not improved
    by more than ``min_delta`` for ``patience`` epochs in a row."""

    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float = 0.0) -> None:
        self.monitor, self.mode = monitor, mode
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.waited = 0

    def exhausted(self, learner) -> None:
        raise NotImplementedError

    def before_fit(self, learner) -> None:
        self.best, self.waited = None, 0

    def after_epoch(self, learner) -> None:
        value = learner.history[-1][self.monitor]
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.waited = value, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            self.waited = 0
            self.exhausted(learner)


class EarlyStopping(Patience):
    """Ends training when ``monitor`` (a column of the epoch row, e.g. valid_loss) has not
    improved for ``patience`` epochs."""

    order = 30

    def exhausted(self, learner) -> None:
        learner.stop = True


class BestCheckpoint(Callback):
    """Keeps the model of the best epoch by ``monitor`` in checkpoints/best (written
    atomically), and with ``restore`` puts those weights back in the model at the end."""

    order = 25

    def __init__(self, run_dir: Path, model_info: dict, monitor: str, mode: str,
                 restore: bool = False) -> None:
        self.folder = Path(run_dir) / "checkpoints" / "best"
        self.model_info = model_info
        self.monitor, self.mode, self.restore = monitor, mode, restore
        self.best: float | None = None
        self.best_epoch = 0

    def after_epoch(self, learner) -> None:
        value = learner.history[-1][self.monitor]
        if improved(value, self.best, self.mode):
            self.best, self.best_epoch = value, len(learner.history)
            self.folder.mkdir(parents=True, exist_ok=True)
            runs.save_model(self.folder, learner.eval_model,
                            {**self.model_info, "epochs_trained": self.best_epoch,
                             self.monitor: value})

    def after_fit(self, learner) -> None:
        if self.restore and self.best_epoch:
            run_records.load_weights(learner.eval_model, self.folder)


class ReduceOnPlateau(Patience):
    """Multiplies the learning rate by ``factor`` whenever ``monitor`` has not improved for
    ``patience`` epochs (a controller on top of the schedule: ``learner.lr_factor``)."""

    order = 29

    def __init__(self, monitor: str, mode: str, patience: int, factor: float = 0.1,
                 min_delta: float = 0.0) -> None:
        super().__init__(monitor, mode, patience, min_delta)
        self.factor = factor

    def exhausted(self, learner) -> None:
        learner.lr_factor *= self.factor
