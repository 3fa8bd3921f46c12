"""Overfitting on purpose across model sizes: the same fit for each of several models, and
their training and validation losses side by side, to see where more capacity stops paying.

A sweep directory holds one ordinary run directory per model (named by the model), and for
the whole: ``sweep.csv`` and ``sweep.json`` (a row per model: its trainable parameters, its
best validation figure of the task's main metric, the epoch of it, the generalization gap
there, the epochs run, the seconds, the run directory, and why it failed when it did),
``sweep.png`` (the losses per epoch and the gap per epoch) and ``config.yaml``. The figures
come from each run's metrics.csv.

Each model trains with early stopping (``SweepConfig.early_stop``: a patience of 3 unless
set), so a model that overfits stops a few epochs past its best and the figure shows the
turn. With ``--budget``, each model gets an equal share of the time left when it starts
(``Budget.share``, as the folds of ``cv`` do), planned by the fit's budget planner; early
stopping stays on then too, since the plan fills the share with steps however early the
validation loss turns, and a model that stops early leaves the rest to those after it.

A model that fails (its loss diverges, its options do not fit it) is recorded as failed with
the reason, and the sweep goes on. Ctrl-C keeps the models that finished (and the finished
epochs of the one interrupted): the table and figure are written for them, then
``SweepInterrupted`` (a ``KeyboardInterrupt``) carries them to the caller.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .. import runs
from ..config import SweepConfig, fit_options, merge_options
from ..data.sources import read_source
from ..data.table import Table
from ..errors import ImagefitError
from ..models import SMALL_CNN_WIDTHS, check_model_name
from ..report.plots import save_sweep_plot
from ..tasks import HIGHER_IS_BETTER
from ..train.budget import Budget
from .fit import run_fit, run_name
from .loading import check_data
from .recipes import apply_recipe

SWEEP_TABLE = "sweep.csv"
SWEEP_INFO = "sweep.json"
SWEEP_FIGURE = "sweep.png"
SWEEP_END_SECONDS = 3.0  # a --budget sweep's table and figure, after the last fit
COLUMNS = ["model", "status", "params", "metric", "best", "best_epoch", "gap_at_best",
           "epochs", "seconds", "run_dir", "error"]


@dataclass
class SweepResult:
    """What ``sweep`` returns: its directory and a row per model (see ``COLUMNS``)."""

    sweep_dir: Path
    rows: list[dict]

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "failed"]


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: ``result`` holds the models kept, whose table and figure are
    written."""

    def __init__(self, result: SweepResult) -> None:
        done = sum(row["status"] == "done" for row in result.rows)
        super().__init__(f"interrupted after {done} finished model(s)")
        self.result = result


def sweep(data: str | Path | Table, config: SweepConfig | None = None,
          **options: Any) -> SweepResult:
    """Train each model of ``--models`` (or ``--widths``) on ``data`` with the same options
    and write a sweep directory."""
    cfg: SweepConfig = merge_options(SweepConfig, config, options)
    started = time.perf_counter()
    budget = Budget.from_options(cfg)
    names = model_names(cfg)
    table = data if isinstance(data, Table) else read_source(data, cfg)
    check_data(table, cfg)  # before the sweep directory: the models' fits find the cache made
    require_validation(table, cfg)
    sweep_dir = runs.new_run_dir(cfg.runs_dir, (cfg.name or run_name(data)) + "_sweep")
    runs.save_yaml(sweep_dir / "config.yaml", {
        "data": None if isinstance(data, Table) else str(data),
        "data_description": table.description, **cfg.model_dump()})
    metric = f"valid_{table.task.main_metric}"
    rows: list[dict] = []

    def write(status: str) -> SweepResult:
        return write_sweep(sweep_dir, rows, {
            "status": status, "models": names, "metric": metric,
            "higher_is_better": HIGHER_IS_BETTER[metric.removeprefix("valid_")],
            "seconds": round(time.perf_counter() - started, 3),
            **({"budget": {"budget": budget.text, "budget_seconds": budget.seconds,
                           "used_seconds": round(budget.used(), 3)}} if budget else {})})

    try:
        for index, name in enumerate(names):
            print(f"model {index + 1}/{len(names)}: {name}", flush=True)
            model_started = time.perf_counter()
            rows.append(fit_model(table, cfg, name, sweep_dir / folder_name(name), metric,
                                  budget, models_left=len(names) - index))
            write("running")
    except KeyboardInterrupt as interrupt:
        kept = getattr(interrupt, "run_dir", None)  # a FitInterrupted's finished epochs
        if kept is not None:
            rows.append(model_row(name, kept, metric, "interrupted",
                                  time.perf_counter() - model_started))
        raise SweepInterrupted(write("interrupted")) from None
    return write("done")


def model_names(cfg: SweepConfig) -> list[str]:
    """The models ``--models`` or ``--widths`` names, each checked before anything trains."""
    if cfg.widths:
        flag, given = "--widths", [str(width) for width in cfg.widths]
        unknown = [width for width in cfg.widths if width not in SMALL_CNN_WIDTHS]
        if unknown:
            raise ImagefitError(f"option --widths: imagefit has no small net of width "
                                f"{unknown[0]}; give widths among "
                                f"{', '.join(map(str, SMALL_CNN_WIDTHS))}")
        names = [SMALL_CNN_WIDTHS[width] for width in cfg.widths]
    else:
        flag, names = "--models", list(cfg.models)
        given = names
        for name in names:
            if name != "auto":
                try:
                    check_model_name(name)
                except ImagefitError as error:
                    raise ImagefitError(f"option --models: {error}") from None
    repeated = next((item for position, item in enumerate(given) if item in given[:position]),
                    None)
    if repeated is not None:
        raise ImagefitError(f"option {flag}: {repeated} is given twice: give each model once")
    return names


def require_validation(table: Table, cfg: SweepConfig) -> None:
    if cfg.valid_pct == 0 and not (table.split == "valid").any():
        raise ImagefitError("imagefit sweep compares the models' validation losses: give "
                            "--valid-pct above 0 or data with a validation split")


def folder_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-.") or "model"


def fit_model(table: Table, cfg: SweepConfig, name: str, run_dir: Path, metric: str,
              budget: Budget | None, models_left: int) -> dict:
    """One model's fit in ``run_dir`` (with its share of the budget) and its row; a failure
    becomes the row's reason."""
    length = {"epochs": cfg.epochs} if budget is None else {}
    model_cfg = fit_options(cfg, **length, early_stop=cfg.early_stop, model=name, name=name,
                            runs_dir=str(run_dir.parent), augment=cfg.augment,
                            label_smoothing=cfg.label_smoothing, report=cfg.report)
    apply_recipe(model_cfg)
    share = None if budget is None else budget.share(models_left, reserve=SWEEP_END_SECONDS)
    started = time.perf_counter()
    try:
        result = run_fit(table, model_cfg, run_dir=run_dir, budget=share)
    except Exception as error:  # recorded; the other models still train
        reason = one_line(error)
        print(f"{name} failed: {reason}", flush=True)
        return model_row(name, run_dir, metric, "failed", time.perf_counter() - started,
                         error=reason)
    if budget is not None:  # building the image cache is not counted
        budget.exclude(result.metrics["budget"]["not_counted_seconds"])
    params = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    return model_row(name, run_dir, metric, "done", time.perf_counter() - started, params)


def one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    if isinstance(error, ImagefitError) and text:
        return text[0]
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def read_history(run_dir: Path) -> pd.DataFrame:
    """The run's metrics.csv: a row per finished epoch (empty when none finished)."""
    path = run_dir / "metrics.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def model_row(name: str, run_dir: Path, metric: str, status: str, seconds: float,
              params: int | None = None, error: str | None = None) -> dict:
    """A model's row: its best epoch by ``metric`` (the first of equals) and the gap
    between validation and training loss there, from the run's metrics.csv."""
    history = read_history(run_dir)
    row = {"model": name, "status": status, "params": params, "metric": metric, "best": None,
           "best_epoch": None, "gap_at_best": None, "epochs": len(history),
           "seconds": round(seconds, 3), "run_dir": str(run_dir) if run_dir.is_dir() else None,
           "error": error}
    values = history[metric].dropna() if metric in history else pd.Series(dtype=float)
    if len(values):
        higher = HIGHER_IS_BETTER[metric.removeprefix("valid_")]
        best = history.loc[values.idxmax() if higher else values.idxmin()]
        row.update(best=float(best[metric]), best_epoch=int(best["epoch"]),
                   gap_at_best=float(best["valid_loss"] - best["train_loss"]))
    return row


def write_sweep(sweep_dir: Path, rows: list[dict], info: dict) -> SweepResult:
    """sweep.csv, sweep.json and sweep.png for the rows so far, written together."""
    curves = {}
    for row in rows:
        history = read_history(Path(row["run_dir"])) if row["run_dir"] else pd.DataFrame()
        if {"epoch", "train_loss", "valid_loss"} <= set(history.columns):
            curves[row["model"]] = {column: history[column].tolist()
                                    for column in ("epoch", "train_loss", "valid_loss")}
    with runs.interrupts_deferred():
        runs.write_atomic(sweep_dir / SWEEP_TABLE,
                          pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
        runs.save_json(sweep_dir / SWEEP_INFO, {**info, "rows": rows})
        save_sweep_plot(curves, sweep_dir / SWEEP_FIGURE)
    return SweepResult(sweep_dir, list(rows))


def format_sweep(result: SweepResult) -> str:
    """The rows as an aligned table for the terminal, each failed model's reason below."""
    if not result.rows:
        return "no model finished an epoch"
    metric = result.rows[0]["metric"]
    header = ["model", "params", f"best {metric}", "best epoch", "gap at best", "epochs",
              "seconds", "status"]
    cells = [[row["model"], _text(row["params"], "{:,}"), _text(row["best"], "{:.4f}"),
              _text(row["best_epoch"]), _text(row["gap_at_best"], "{:+.4f}"),
              str(row["epochs"]), f"{row['seconds']:.1f}", row["status"]] for row in result.rows]
    widths = [max(map(len, column)) for column in zip(header, *cells)]

    def line(values: list[str]) -> str:
        first, *numbers, status = values
        return "  ".join([first.ljust(widths[0]),
                          *(v.rjust(w) for v, w in zip(numbers, widths[1:-1])), status])

    lines = [line(header), *map(line, cells)]
    lines += [f"{row['model']} failed: {row['error']}" for row in result.failed]
    return "\n".join(lines)


def _text(value: Any, spec: str = "{}") -> str:
    return "-" if value is None else spec.format(value)
