"""Cross-validation: K models on K folds, their out-of-fold predictions and the spread of
their figures, optionally a final model on all the training data.

A CV directory holds ``folds.csv`` (reusable with ``--folds-file``), ``fold_0`` ..
``fold_{K-1}`` (ordinary run directories), ``oof.csv`` (every training row predicted once,
by the model that did not train on it), ``cv_metrics.csv`` (a row per fold), ``cv.json``
(mean and standard deviation, and the metrics of the out-of-fold predictions as a whole),
``report.html``, and ``all/`` with ``--train-on-all``. ``predict`` on a CV directory averages
its fold models (see ``inference.load_models``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import run_records, runs
from ..config import CVConfig, LabelIssuesOptions, fit_options, merge_options
from ..data.folds import (
    NOT_IN_FOLDS,
    assign_folds,
    load_folds,
    read_groups,
    save_folds,
    split_for_fold,
)
from ..data.inputs import table_input
from ..data.sources import read_source
from ..data.table import Table
from ..errors import ImagefitError
from ..evaluation.label_issues import require_cleanlab
from ..metrics import all_metrics
from ..report.interpret import interpret
from ..tasks import HIGHER_IS_BETTER, Task, task_class
from ..train.budget import Budget
from .fit import run_fit
from .loading import check_data
from .recipes import apply_recipe, choose_photo_weights
from .record import FitResult

CV_INFO = "cv.json"
OOF = "oof.csv"
FOLD_METRICS = "cv_metrics.csv"
CV_END_SECONDS = 10.0  # a --budget cv's out-of-fold files and report, after the last fit


@dataclass
class CVResult:
    """What ``cv`` returns: its directory, per-fold figures, their summary, the OOF table."""

    cv_dir: Path
    folds: list[dict]
    summary: dict[str, Any]
    oof: pd.DataFrame
    all_run: Path | None = None


def cv(data: str | Path | Table, config: CVConfig | None = None, **options: Any) -> CVResult:
    """Train one model per fold of ``data``'s training rows and write a CV directory."""
    cfg: CVConfig = merge_options(CVConfig, config, options)
    if cfg.find_label_issues:
        require_cleanlab()  # before hours of folds
    started = time.perf_counter()
    budget = Budget.from_options(cfg)
    table = data if isinstance(data, Table) else read_source(data, cfg)
    if cfg.find_label_issues and not table.task.has_classes:
        raise ImagefitError("--find-label-issues is for classification; this data's task is "
                            "regression: look at its largest errors in the CV report instead")
    folds = _folds(table, cfg, data)
    size = check_data(table, cfg)  # before the CV directory: the folds find the cache made
    if size is not None:
        choose_photo_weights(cfg, size)  # once for every fold, said once
    name = (cfg.name or _source_name(data)) + "_cv"
    cv_dir = runs.new_run_dir(cfg.runs_dir, name)
    runs.save_yaml(cv_dir / "config.yaml", {
        "data": None if isinstance(data, Table) else str(data),
        "data_description": table.description, **cfg.model_dump()})
    save_folds(cv_dir / "folds.csv", folds, table.paths)
    task_kind = table.task.kind
    rows, oof_parts = [], []
    for fold in range(cfg.folds):
        print(f"fold {fold + 1}/{cfg.folds}")
        fold_cfg = fit_options(cfg, name=f"fold_{fold}", runs_dir=str(cv_dir))
        apply_recipe(fold_cfg)
        fold_budget = None  # what is left, shared by the fits still to run
        if budget is not None:
            fold_budget = budget.share(cfg.folds - fold + int(cfg.train_on_all),
                                       reserve=CV_END_SECONDS)
        result = run_fit(split_for_fold(table, folds, fold), fold_cfg,
                         run_dir=cv_dir / f"fold_{fold}", budget=fold_budget)
        if budget is not None:  # building the image cache is not counted
            budget.exclude(result.metrics["budget"]["not_counted_seconds"])
        rows.append(_fold_row(fold, result))
        oof_parts.append((fold, *result.outputs["valid"]))
        _print_fold(rows[-1], task_kind)
        pd.DataFrame(rows).to_csv(cv_dir / FOLD_METRICS, index=False)
    task = Task.from_dict(run_records.read_model_info(cv_dir / "fold_0")["task"])
    oof = _oof_frame(table, task, oof_parts)
    runs.write_atomic(cv_dir / OOF, oof.to_csv(index=False))
    summary = _summarize(rows, task, table, oof_parts, cfg, cv_dir)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    all_run = None
    if cfg.train_on_all:
        epochs = summary["epochs_for_all"]
        length = f"for {epochs} epochs" if budget is None else "in the rest of the budget"
        print(f"all: training on every training row {length}")
        changes = {"epochs": epochs} if budget is None else {}
        all_cfg = fit_options(cfg, **changes, valid_pct=0.0, early_stop=None,
                               keep_best=False, plateau=None, name="all",
                               runs_dir=str(cv_dir))
        all_budget = None if budget is None else budget.share(1, reserve=CV_END_SECONDS)
        all_run = run_fit(_all_training(table, folds), all_cfg, run_dir=cv_dir / "all",
                          budget=all_budget).run_dir
        summary["all_run"] = "all"
    if budget is not None:
        summary["budget"] = {"budget": budget.text, "budget_seconds": budget.seconds,
                             "used_seconds_before_report": round(budget.used(), 3)}
    runs.save_json(cv_dir / CV_INFO, summary)
    from ..report.cv_report import write_cv_report

    write_cv_report(cv_dir)
    if cfg.find_label_issues:
        from .label_issues import format_issues, label_issues

        print(format_issues(label_issues(cv_dir, options=LabelIssuesOptions(
            cache_dir=cfg.cache_dir, progress=cfg.progress))))
    return CVResult(cv_dir, rows, summary, oof, all_run)


def _all_training(table: Table, folds: np.ndarray) -> Table:
    """The table with every row of every fold in training (test rows stay test)."""
    split = table.split.copy()
    split[folds != NOT_IN_FOLDS] = "train"
    return replace(table, split=split)


def _source_name(data: str | Path | Table) -> str:
    if isinstance(data, Table):
        return data.description or "arrays"
    text = str(data)
    return text.removeprefix("builtin:") if text.startswith("builtin:") else Path(text).stem


def _folds(table: Table, cfg: CVConfig, data) -> np.ndarray:
    if cfg.folds_file:
        folds = load_folds(cfg.folds_file, table)
        found = int(folds.max()) + 1
        if found != cfg.folds:
            raise ImagefitError(f"--folds-file {cfg.folds_file} holds {found} folds but "
                                f"--folds is {cfg.folds}: give --folds {found}")
        return folds
    groups = None
    if cfg.group_col:
        if isinstance(data, Table) or Path(str(data)).suffix.lower() != ".csv":
            raise ImagefitError("--group-col reads a column of the CSV file: give a CSV as "
                                "DATA")
        groups = read_groups(data, cfg.group_col, table)
    return assign_folds(table, cfg.folds, seed=cfg.seed, method=cfg.fold_method,
                        groups=groups)


def _fold_row(fold: int, result: FitResult) -> dict:
    metrics = result.metrics
    best = metrics.get("best_epoch")
    row = {"fold": fold, "run": result.run_dir.name, "n_train": metrics.get("n_train"),
           "n_valid": metrics.get("n_valid"), "epochs": metrics.get("epochs"),
           "best_epoch": best if best is not None else metrics.get("epochs")}
    row.update({k: v for k, v in metrics.items()
                if k.startswith(("valid_", "test_")) and isinstance(v, (int, float))})
    row["seconds"] = metrics.get("seconds")
    return row


def _print_fold(row: dict, kind: str) -> None:
    main = task_class(kind).main_metric
    shown = [f"valid_{main} {row[f'valid_{main}']:.4f}"]
    if f"test_{main}" in row:
        shown.append(f"test_{main} {row[f'test_{main}']:.4f}")
    print(f"fold {row['fold']}: " + "  ".join(shown))


def _oof_frame(table: Table, task: Task, parts: list) -> pd.DataFrame:
    """A row per training row: its fold, its given target and the out-of-fold prediction."""
    frames = []
    for fold, rows, outputs in parts:
        activated = task.activate(outputs)
        frame = pd.DataFrame({"row": rows, "fold": fold})
        if table.paths is not None:
            frame["path"] = [table.paths[r] for r in rows]
        if not table_input(table).reads_images:
            frame["text"] = [table.texts[r] for r in rows]
        if task.single_label:
            frame["label"] = [task.names[i] for i in np.asarray(table.targets)[rows]]
            frame["predicted"] = task.decode(activated)
            for i, name in enumerate(task.names):
                frame[f"prob_{name}"] = activated[:, i].numpy()
        elif task.multi_label:
            given = np.asarray(table.targets)[rows]
            frame["labels"] = [";".join(n for n, on in zip(task.names, r) if on >= 0.5)
                               for r in given]
            frame["predicted"] = task.decode(activated)
            for i, name in enumerate(task.names):
                frame[f"prob_{name}"] = activated[:, i].numpy()
        else:
            given = np.asarray(table.targets).reshape(len(table), -1)[rows]
            for i, name in enumerate(task.names):
                frame[name] = given[:, i]
                frame[f"predicted_{name}"] = activated[:, i].numpy()
        frames.append(frame)
    return pd.concat(frames).sort_values("row").reset_index(drop=True)


def _summarize(rows: list[dict], task: Task, table: Table, parts: list, cfg: CVConfig,
               cv_dir: Path) -> dict:
    """Mean and standard deviation of every figure over the folds, and the metrics of all
    out-of-fold predictions together."""
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c.startswith(("valid_", "test_"))]
    summary: dict[str, Any] = {
        "folds": cfg.folds, "fold_method": cfg.fold_method, "task": task.kind,
        "runs": [row["run"] for row in rows],
        "mean": {c: float(frame[c].mean()) for c in numeric},
        "std": {c: float(frame[c].std(ddof=1)) for c in numeric},
    }
    all_rows = np.concatenate([r for _, r, _ in parts])
    outputs = torch.cat([o for _, _, o in parts])
    targets = task.encode_targets(np.asarray(table.targets)[all_rows])
    summary["oof"] = all_metrics(task, outputs, targets)
    summary["oof"]["loss"] = task.loss(outputs, targets).item()
    summary["epochs_for_all"] = int(np.median(frame["best_epoch"].astype(float)))
    interpretation = interpret(task, outputs, targets, _no_images, cv_dir / "plots",
                               None, "out-of-fold", k=0)
    runs.save_json(cv_dir / "interpretation.json", interpretation)
    summary["higher_is_better"] = HIGHER_IS_BETTER[task.main_metric]
    return summary


def _no_images(positions: np.ndarray) -> torch.Tensor:
    raise AssertionError("the CV interpretation draws no image grid")


def format_cv(result: CVResult) -> str:
    """Per-fold main metric and mean +- std, for the terminal."""
    main = task_class(result.summary["task"]).main_metric
    lines = []
    for split in ("valid", "test"):
        column = f"{split}_{main}"
        if column not in result.summary["mean"]:
            continue
        values = "  ".join(f"{row[column]:.4f}" for row in result.folds)
        lines.append(f"{column} per fold: {values}")
        lines.append(f"{column} mean {result.summary['mean'][column]:.4f} +- "
                     f"{result.summary['std'][column]:.4f} (std over {len(result.folds)} "
                     "folds)")
    lines.append(f"out-of-fold {main}: {result.summary['oof'][main]:.4f}")
    return "\n".join(lines)
