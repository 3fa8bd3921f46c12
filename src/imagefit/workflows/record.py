"""What a fit leaves in its run directory at the end: the final model (EMA or best epoch)
and its evaluation, metrics.json with how the run ended (done, interrupted or failed), the
data summary and the report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed, runs
from ..config import FitConfig
from ..data.inputs import table_input
from ..data.table import Table
from ..data.text import text_summary
from ..report.dataset import summarize_dataset
from ..report.html import DATA_SUMMARY
from ..report.html import write_report as write_report_page
from ..report.plots import save_metrics_plot, save_training_plot
from ..train.budget import BudgetPlanner
from ..train.callbacks import BestCheckpoint, RunWriter
from ..train.learner import Learner
from .build import TrainingParts
from .conclude import conclude
from .loading import LoadedData
from .phases import Prepared, budget_line


@dataclass
class FitResult:
    """What ``fit`` returns: the run directory, final metrics, per-epoch history, model."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict]
    model: nn.Module
    # raw outputs of the final model per split: {"valid": (table rows, outputs), ...}
    outputs: dict[str, tuple[np.ndarray, torch.Tensor]] = field(default_factory=dict)


def record_failure(run_dir: Path, learner: Learner | None, writer: RunWriter, summary: dict,
                    started: float, error: BaseException) -> None:
    """metrics.json of a failed run: status 'failed', the error, the epochs kept."""
    if not distributed.is_main():
        return
    if learner is not None:
        del learner.history[writer.epochs_saved:]
    message = str(error).strip() or type(error).__name__
    write_final_metrics(run_dir, learner, {**summary, "error": message}, started,
                         status="failed")
    with open(run_dir / "log.txt", "a") as log:
        log.write(f"failed: {message}\n")


def run_summary(data: str | Path | Table, loaded: LoadedData, parts: TrainingParts,
                 notes: dict) -> dict:
    """What metrics.json says of the data, before the figures are added."""
    table, prepared = loaded.table, loaded.prepared
    return {
        "data": run_source(data),
        "task": parts.task.kind,
        "n_train": len(loaded.train_rows), "n_valid": len(loaded.valid_rows),
        **({"n_train_sampled": parts.n_train_sampled} if parts.n_train_sampled else {}),
        "n_test": len(loaded.test_rows),
        "skipped_files": len(prepared.cache.errors),
        "skipped": [table.paths[r] for r in prepared.cache.failed] if table.paths else [],
        "cache_seconds": round(loaded.cache_seconds, 3),
        "cache_on_device": parts.loaders["train"] is not None
        and parts.loaders["train"].images.device.type == "cuda",
        **notes,
    }


def finish(run_dir: Path, prepared: Prepared, learner: Learner, best: BestCheckpoint | None,
           planner: BudgetPlanner | None, summary: dict, started: float) -> FitResult:
    """The final model (EMA or best epoch), its evaluation, metrics.json and the report."""
    main = distributed.is_main()
    cfg, parts, loaded = prepared.options, prepared.parts, prepared.loaded
    if main:
        runs.save_steps(run_dir, learner.step_log)
        save_training_plot(learner.step_log, learner.history,
                           run_dir / "plots" / "training.png")
    if learner.ema is not None:  # the model ends with the averaged weights it was judged on
        parts.model.load_state_dict(learner.ema.module.state_dict())
    final_row = learner.history[-1]
    if best is not None and best.best_epoch:  # the model now holds the best epoch's weights
        final_row = learner.history[best.best_epoch - 1]
        runs.save_model(run_dir, parts.model, {**parts.model_info,
                                               "epochs_trained": best.best_epoch})
        summary["best_epoch"] = best.best_epoch
    distributed.share_weights(parts.model)  # every rank concludes with rank 0's final model
    concluding = time.perf_counter()
    figures, outputs = conclude(run_dir, cfg, parts, loaded, parts.model)
    summary.update(figures)
    if planner is not None:
        summary["budget"] = {**prepared.budget.record(), **planner.summary()}
    metrics = write_final_metrics(run_dir, learner, summary, started, status="done",
                                  final_row=final_row)
    write_report(run_dir, learner, cfg)
    metrics["final_seconds"] = round(time.perf_counter() - concluding, 3)
    if planner is not None:
        metrics["budget"]["used_seconds"] = round(prepared.budget.used(), 3)
        if main:
            print(budget_line(metrics["budget"]))
    if main:
        runs.save_json(run_dir / "metrics.json", metrics)
    return FitResult(run_dir=run_dir, metrics=metrics, history=learner.history,
                     model=parts.model, outputs=outputs)


def summarize_data(run_dir: Path, loaded, parts, seed: int) -> None:
    splits = {"train": loaded.train_rows, "valid": loaded.valid_rows, "test": loaded.test_rows}
    if not table_input(loaded.table).reads_images:
        runs.save_json(run_dir / DATA_SUMMARY, text_summary(loaded.table, loaded.prepared,
                                                            splits))
        return
    norm = parts.model_info["normalization"]
    summary = summarize_dataset(loaded.table, loaded.prepared.cache, splits, norm["mean"],
                                norm["std"], run_dir / "plots", seed=seed)
    runs.save_json(run_dir / DATA_SUMMARY, summary)


def write_report(run_dir: Path, learner: Learner, cfg: FitConfig) -> None:
    if not distributed.is_main():
        return
    if learner.history:
        save_metrics_plot(learner.history, run_dir / "plots" / "epochs.png")
    if cfg.report:
        write_report_page(run_dir)


def write_final_metrics(run_dir: Path, learner: Learner | None, summary: dict,
                         started: float, status: str, final_row: dict | None = None) -> dict:
    """metrics.json: the final (or last finished) epoch's validation figures, the summary
    and how the run ended: ``status`` done, interrupted or failed."""
    history = learner.history if learner is not None else []
    last = final_row or (history[-1] if history else {})
    train_seconds = learner.train_seconds if learner is not None else 0.0
    train_images = learner.train_images if learner is not None else 0
    metrics = {
        **{k: v for k, v in last.items() if k.startswith("valid_")},
        **summary,
        "status": status,
        "epochs": len(history),
        "interrupted": status == "interrupted",
        "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(train_images / max(train_seconds, 1e-9), 1),
    }
    if learner is not None and learner.precision == "bf16":
        metrics["bf16_steps_redone_in_fp32"] = learner.fp32_redone
    if distributed.is_main():
        runs.save_json(run_dir / "metrics.json", metrics)
    return metrics


def run_source(data: str | Path | Table) -> str:
    """How metrics.json and config.yaml name the data: its path or name, or the table's
    description."""
    return data.description if isinstance(data, Table) else str(data)
