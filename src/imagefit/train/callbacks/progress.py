"""A progress bar over each epoch's batches and one printed line per epoch."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .base import Callback


def format_row(row: dict, columns: list[str]) -> str:
    cells = []
    for column in columns:
        value = row.get(column, "")
        if column == "time":
            value = f"{value:.1f}s"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        cells.append(f"{value!s:>{max(len(column), 6)}}")
    return "  ".join(cells)


class ProgressCallback(Callback):
    """Shows a bar while an epoch trains and prints ``epoch train_loss valid_loss metrics
    time`` after it; the same lines go to ``log_path`` when given."""

    order = 10

    def __init__(self, show_bar: bool = True, log_path: Path | None = None) -> None:
        self.show_bar = show_bar
        self.log_path = log_path
        self.columns: list[str] = []
        self.bar = None

    def write(self, line: str) -> None:
        tqdm.write(line)
        if self.log_path is not None:
            with open(self.log_path, "a") as log:
                log.write(line + "\n")

    def before_fit(self, learner) -> None:
        self.columns = []

    def before_epoch(self, learner) -> None:
        self.bar = tqdm(total=len(learner.train_loader), desc=f"epoch {learner.epoch + 1}",
                        leave=False, disable=None if self.show_bar else True,
                        unit="batch")

    def after_batch(self, learner) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.update(1)
            if learner.step % 10 == 0:
                self.bar.set_postfix(loss=f"{learner.loss.item():.4f}")

    def after_epoch(self, learner) -> None:
        if self.bar is not None:
            self.bar.close()
        row = learner.history[-1]
        if not self.columns:
            self.columns = list(row)
            self.write("  ".join(f"{c:>{max(len(c), 6)}}" for c in self.columns))
        self.write(format_row(row, self.columns))
