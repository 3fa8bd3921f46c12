"""tune.html: an ``imagefit tune`` study as a page in report.html's style: the best trial
and its options, the refits against the defaults, every trial, and Optuna's own plots
(optimization history, parameter importances, parallel coordinates) drawn by
optuna.visualization.matplotlib. Autoescaped: option values and errors reach it as text."""

from __future__ import annotations

import base64
import os
import warnings
from pathlib import Path

from .html import environment, format_value
from .plots import save_figure

PAGE = "tune.html"
PLOTS = {"history": ("plot_optimization_history", "Each trial's value and the best so far"),
         "importances": ("plot_param_importances",
                         "How much each option explains the value (fANOVA)"),
         "parallel": ("plot_parallel_coordinate", "Each finished trial's options and value")}


def save_tune_plots(study, folder: Path) -> dict[str, str]:
    """Optuna's plots of the study as PNGs (those it can draw with the trials so far):
    name -> the reason it could not, or the empty string."""
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    notes = {}
    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    for name, (function, _) in PLOTS.items():
        path = folder / f"{name}.png"
        if len(finished) < (2 if name != "history" else 1):
            notes[name] = "needs more finished trials"
            path.unlink(missing_ok=True)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(optuna_plots, function)(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(8, 4.5)
            save_figure(figure, path)
            notes[name] = ""
        except Exception as error:  # a plot Optuna cannot draw for these trials
            notes[name] = f"not drawn ({type(error).__name__}: {str(error)[:120]})"
            path.unlink(missing_ok=True)
    return notes


def write_tune_page(tune_dir: Path, study, info: dict, rows: list[dict]) -> Path:
    notes = save_tune_plots(study, tune_dir / "plots")
    plots = []
    for name, (_, caption) in PLOTS.items():
        path = tune_dir / "plots" / f"{name}.png"
        source = ("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
                  if path.is_file() else None)
        plots.append({"caption": caption, "src": source, "note": notes.get(name, "")})
    params = sorted({k for row in rows for k in row if k.startswith("param_")})
    best = info.get("best")
    link = None
    if best and best.get("run_dir"):
        report = Path(best["run_dir"]) / "report.html"
        link = os.path.relpath(report, tune_dir) if report.is_file() else None
    html = environment.get_template(PAGE).render(
        title=f"imagefit tune: {info['study']}", info=info, best=best, link=link,
        confirm=info.get("confirm"), plots=plots,
        params=[p.removeprefix("param_") for p in params],
        rows=[{**row, "cells": [format_value(row.get(p)) for p in params],
               "value_text": format_value(row["value"])} for row in rows],
        format_value=format_value)
    path = tune_dir / PAGE
    path.write_text(html)
    return path
