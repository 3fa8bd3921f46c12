"""Past runs: a table of the run directories in a folder, and their curves overlaid.

A run directory is a folder holding ``config.yaml`` or ``metrics.json`` (``imagefit fit``
writes ``config.yaml`` first, ``metrics.csv`` and ``model.json`` after each epoch and
``metrics.json`` at the end). Listing never fails on one run: a run killed before it ended is
``incomplete`` and one whose files cannot be parsed is ``unreadable``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime
from numbers import Real
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel

from .. import run_records, runs
from ..errors import ImagefitError
from ..tasks import KINDS
from .plots import plt, save_figure

RUN_COLUMNS = ("run", "date", "name", "data", "model", "epochs", "metric", "value", "seconds",
               "status")
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})_?(.*)$")


class _Unreadable(Exception):
    """A run file exists but does not parse as what imagefit writes."""


def list_runs(root: str | Path = "runs") -> pd.DataFrame:
    """One row per run directory in ``root`` (or ``root`` alone when it is a run), oldest
    first; columns as in ``RUN_COLUMNS``. A folder without runs gives an empty frame, which
    ``format_runs`` shows as a note."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise ImagefitError(f"runs folder {root} {what}: give the folder that holds run "
                            "directories (imagefit fit writes them to runs/)")
    if (root / "tune.json").is_file() and (root / "trials").is_dir():
        root = root / "trials"  # a study's trials, one row each
    run_dirs = [root] if _is_run_dir(root) else [p for p in root.iterdir() if _is_run_dir(p)]
    frame = pd.DataFrame([_describe_run(p) for p in run_dirs], columns=list(RUN_COLUMNS))
    frame = frame.sort_values(["date", "run"], kind="stable", ignore_index=True)
    frame.attrs["root"] = str(root)
    return frame


def format_runs(frame: pd.DataFrame) -> str:
    """``list_runs``'s frame as an aligned text table (date, run, data, model, epochs, main
    metric and value, time, status), or a one-line note when there are no runs."""
    if frame.empty:
        where = frame.attrs.get("root", "this folder")
        return f"no runs in {where}: train one with imagefit fit, or give the runs folder"
    columns = {
        "date": [f"{d:%Y-%m-%d %H:%M}" if pd.notna(d) else "-" for d in frame["date"]],
        "run": list(frame["run"]),
        "data": [_text(v) for v in frame["data"]],
        "model": [_text(v) for v in frame["model"]],
        "epochs": [_text(v if pd.isna(v) else int(v)) for v in frame["epochs"]],
        "metric": [_text(v) for v in frame["metric"]],
        "value": [f"{v:.4g}" if pd.notna(v) else "-" for v in frame["value"]],
        "time": [format_seconds(v) for v in frame["seconds"]],
        "status": list(frame["status"]),
    }
    right_aligned = {"epochs", "value", "time"}
    widths = {name: max(len(name), *map(len, cells)) for name, cells in columns.items()}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(cells[n].rjust(widths[n]) if n in right_aligned else
                         cells[n].ljust(widths[n]) for n in columns).rstrip()

    rows = [line({n: n for n in columns})]
    rows += [line({n: cells[i] for n, cells in columns.items()}) for i in range(len(frame))]
    return "\n".join(rows)


def format_seconds(seconds: float | None) -> str:
    """A duration as ``4.2s``, ``1m23s`` or ``2h05m``; ``-`` when unknown."""
    if seconds is None or pd.isna(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def compare_curves(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, pd.Series]]:
    """Per panel (``train_loss``, ``valid_loss`` and each run's main validation metric,
    e.g. ``valid_accuracy``), the per-epoch series of every run that has it, keyed by the
    run's folder name. Runs of different task kinds share the loss panels and each get
    their own metric's panel; panels no run has are left out."""
    if not run_dirs:
        raise ImagefitError("give at least one run directory to compare")
    paths = [Path(p) for p in run_dirs]
    names = [p.name for p in paths]
    labels = names if len(set(names)) == len(names) else [str(p) for p in paths]
    histories = {label: _compare_history(path) for label, path in zip(labels, paths)}
    panels = ["train_loss", "valid_loss"]
    for label, path in zip(labels, paths):
        main = _main_metric(path, histories[label])
        if main and f"valid_{main}" not in panels:
            panels.append(f"valid_{main}")
    curves = {}
    for panel in panels:
        series = {label: history.set_index("epoch")[panel].dropna()
                  for label, history in histories.items() if panel in history}
        series = {label: values for label, values in series.items() if len(values)}
        if series:
            curves[panel] = series
    return curves


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """One PNG at ``out`` with a panel per curve of ``compare_curves`` against epoch, one
    colour per run, the legend naming the runs; returns the path written."""
    out = runs.output_file(out, "--out", "curves.png")
    curves = compare_curves(run_dirs)
    labels = list(dict.fromkeys(label for series in curves.values() for label in series))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    figure, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.8),
                                squeeze=False)
    for axis, (panel, series) in zip(axes.flat, curves.items()):
        for label, values in series.items():
            axis.plot(values.index, values.to_numpy(), marker="o", markersize=3,
                      color=colours[label], label=label)
        axis.set_title(panel.replace("_", " "))
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=8)
    return save_figure(figure, out)


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.yaml").is_file()
                              or (path / "metrics.json").is_file()
                              or (path / "tune.json").is_file())


def _describe_run(run_dir: Path) -> dict[str, Any]:
    stamp = _STAMP.match(run_dir.name)
    row = {column: math.nan for column in RUN_COLUMNS} | {
        "run": run_dir.name,
        "date": _run_date(run_dir, stamp),
        "name": stamp.group(2) if stamp else run_dir.name,
        "metric": None,
        "status": "unreadable",
    }
    if (run_dir / "sweep.json").is_file():
        return _describe_sweep(run_dir, row)
    if (run_dir / "tune.json").is_file():
        return _describe_tune(run_dir, row)
    try:
        config = _read_mapping(run_dir / "config.yaml") or {}
        metrics = _read_mapping(run_dir / "metrics.json", run_records.MetricsRecord)
        info = _read_mapping(run_dir / runs.MODEL_INFO) or {}
        history = _read_history(run_dir)
    except _Unreadable:
        return row
    last = history.iloc[-1].to_dict() if len(history) else {}
    final = {**last, **(metrics or {})}
    kind = _task_kind(info, final, config)
    main = KINDS[kind].main_metric if kind else None
    candidates = [f"test_{main}", f"valid_{main}"] if kind else []
    metric = next((c for c in [*candidates, "train_loss"] if _is_number(final.get(c))), None)
    seconds = (metrics or {}).get("seconds")
    if seconds is None and "time" in history:
        seconds = history["time"].sum()
    row.update(
        name=config.get("name") or row["name"],
        data=config.get("data_description") or config.get("data") or final.get("data"),
        model=info.get("architecture") or config.get("model"),
        epochs=(metrics or {}).get("epochs", len(history)),
        metric=metric,
        value=final[metric] if metric else math.nan,
        seconds=seconds if _is_number(seconds) else math.nan,
        status="running" if metrics is None and runs.is_locked(run_dir) else _status(metrics),
    )
    return row


def _describe_sweep(sweep_dir: Path, row: dict) -> dict:
    """A sweep directory (``imagefit sweep``): its models, and the best of their figures."""
    try:
        config = _read_mapping(sweep_dir / "config.yaml") or {}
        info = _read_mapping(sweep_dir / "sweep.json") or {}
    except _Unreadable:
        return row
    metric = info.get("metric")
    values = [r["best"] for r in info.get("rows", []) if _is_number(r.get("best"))]
    best = (max if info.get("higher_is_better", True) else min)(values) if values else math.nan
    seconds = info.get("seconds")
    return row | {"name": config.get("name") or row["name"],
                  "data": config.get("data_description") or config.get("data"),
                  "model": "sweep: " + ",".join(info.get("models", [])),
                  "epochs": sum(r.get("epochs") or 0 for r in info.get("rows", [])),
                  "metric": metric if values else None, "value": best,
                  "seconds": seconds if _is_number(seconds) else math.nan,
                  "status": info.get("status", "incomplete")}


def _describe_tune(tune_dir: Path, row: dict) -> dict:
    """A tune directory (``imagefit tune``): its study as one row, with the best trial's
    figure (``imagefit runs TUNE_DIR`` lists the trials)."""
    try:
        setup = _read_mapping(tune_dir / "tune.yaml") or {}
        info = _read_mapping(tune_dir / "tune.json") or {}
    except _Unreadable:
        return row
    best = info.get("best") or {}
    seconds = sum(r.get("seconds") or 0 for r in info.get("rows", []))
    return row | {"name": info.get("study") or row["name"], "data": setup.get("data"),
                  "model": f"tune: {info.get('n_trials', 0)} trials, "
                           f"{info.get('pruned', 0)} pruned",
                  "epochs": sum(r.get("epochs") or 0 for r in info.get("rows", [])),
                  "metric": info.get("metric") if best else None,
                  "value": best.get("value", math.nan), "seconds": seconds or math.nan,
                  "status": "running" if runs.is_locked(tune_dir) else "done"}


def _status(metrics: dict | None) -> str:
    """done, interrupted, failed (diverged or stopped by an error: metrics.json says why) or
    incomplete (no metrics.json: killed; a run still training is 'running')."""
    if metrics is None:
        return "incomplete"
    status = metrics.get("status")
    if status in ("done", "interrupted", "failed"):
        return status
    return "interrupted" if metrics.get("interrupted") else "done"  # written before 'status'


def _run_date(run_dir: Path, stamp: re.Match | None) -> datetime:
    """When the run started: the folder name's timestamp, else the oldest file's mtime."""
    if stamp:
        return datetime.strptime(stamp.group(1), "%Y-%m-%d_%H-%M-%S")
    files = [run_dir / n for n in ("config.yaml", "metrics.json") if (run_dir / n).is_file()]
    return datetime.fromtimestamp(min(p.stat().st_mtime for p in files or [run_dir]))


def _read_mapping(path: Path, schema: type[BaseModel] | None = None) -> dict | None:
    """The mapping stored in ``path``, checked against ``schema``; None when the file is
    missing."""
    try:
        return run_records.read_record(path, schema, missing_ok=True)
    except ImagefitError as error:
        raise _Unreadable(path) from error


def _read_history(run_dir: Path) -> pd.DataFrame:
    """metrics.csv as numbers, one row per finished epoch; empty when there is none yet."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return pd.DataFrame()
    try:
        history = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (OSError, ValueError) as error:  # pandas' ParserError is a ValueError
        raise _Unreadable(path) from error
    history = history.apply(pd.to_numeric, errors="coerce")
    if "epoch" not in history:
        history.insert(0, "epoch", range(1, len(history) + 1))
    return history.dropna(subset=["epoch", history.columns[-1]])  # a row cut short is unfinished


def _compare_history(run_dir: Path) -> pd.DataFrame:
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "not found"
        raise ImagefitError(f"run {run_dir} {what}: give run directories, such as the folders "
                            "imagefit runs lists")
    if not (run_dir / "metrics.csv").is_file():
        raise ImagefitError(f"run {run_dir} has no metrics.csv (it finished no epoch): leave "
                            "it out, or give runs that trained at least one epoch")
    try:
        history = _read_history(run_dir)
    except _Unreadable:
        raise ImagefitError(f"run {run_dir}: metrics.csv cannot be read; leave the run out"
                            ) from None
    if history.empty:
        raise ImagefitError(f"run {run_dir} has no epochs in metrics.csv: leave it out")
    return history


def _main_metric(run_dir: Path, history: pd.DataFrame) -> str | None:
    """The main metric of a run's task; None when the kind cannot be told."""
    try:
        info = _read_mapping(run_dir / runs.MODEL_INFO) or {}
        metrics = _read_mapping(run_dir / "metrics.json", run_records.MetricsRecord) or {}
    except _Unreadable:
        info, metrics = {}, {}
    kind = _task_kind(info, {**dict.fromkeys(history.columns), **metrics}, {})
    return KINDS[kind].main_metric if kind else None


def _task_kind(info: dict, metrics: dict, config: dict) -> str | None:
    """The task kind from model.json, metrics.json or config.yaml, else from which metrics
    were recorded (each kind has its own pair)."""
    task = info.get("task")
    for kind in (task.get("kind") if isinstance(task, dict) else None, metrics.get("task"),
                 config.get("task")):
        if kind in KINDS:
            return kind
    recorded = {key.split("_", 1)[1] for key in metrics if key.startswith(("valid_", "test_"))}
    return next((kind for kind, cls in KINDS.items()
                 if set(cls.default_metrics) <= recorded), None)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)


def _text(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        str(value))
