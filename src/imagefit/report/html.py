"""report.html: one self-contained page per run directory (plots embedded as data URIs).

The page is rendered by jinja2 with autoescaping on, so every string that comes from the
user's data (class names, paths, options) reaches the page as text, never as markup.
``regenerate`` redraws the plots it can from the run's own files first, so that
``imagefit report RUN`` needs neither the data nor the model's training.
"""

from __future__ import annotations

import base64
import math
import time
import warnings
from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from pydantic import BaseModel
from safetensors import SafetensorError

from .. import run_records, runs
from ..data.inputs import INPUTS, ImageInput
from ..errors import ImagefitError, ImagefitWarning
from ..tasks import task_class
from ..version import __version__
from .plots import save_metrics_plot, save_training_plot

REPORT = "report.html"
DATA_SUMMARY = "data_summary.json"
INTERPRETATION = "interpretation.json"
TRAINING_PLOTS = (("training.png", "Learning rate, momentum and loss per step"),
                  ("epochs.png", "Loss and metrics per epoch"),
                  ("lr_find.png", "LR finder"))

environment = jinja2.Environment(
    loader=jinja2.PackageLoader("imagefit.report", "templates"),
    autoescape=True, trim_blocks=True, lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


def format_value(value: Any) -> str:
    """A cell: floats to 4 significant digits, lists joined, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    return str(value)


def table_section(title: str, rows: list[dict], columns: Iterable[str] | None = None) -> dict:
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    numeric = [all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                   for row in rows if row.get(c) is not None) for c in columns]
    return {"title": title, "columns": [c.replace("_", " ") for c in columns],
            "numeric": numeric,
            "rows": [[format_value(row.get(c)) for c in columns] for row in rows]}


def _figure(run_dir: Path, file: str, title: str) -> dict | None:
    path = run_dir / file
    if not path.is_file():
        return None
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"title": title, "src": f"data:image/png;base64,{data}"}


def read_run_file(path: Path, reader) -> Any:
    """A run file's content; None when it is missing, and a warning when it is damaged (the
    page leaves out what it held)."""
    try:
        return reader(path) if path.is_file() else None
    except (OSError, ValueError) as error:
        warnings.warn(f"{path} is damaged ({type(error).__name__}): the report leaves out "
                      "what it held", ImagefitWarning, stacklevel=2)
        return None


def read_run_mapping(path: Path, schema: type[BaseModel] | None = None) -> dict:
    """A run file's mapping (YAML or JSON, checked by ``run_records.read_record``); empty when it
    is missing, and a warning when it is damaged (the page leaves out what it held)."""
    try:
        return run_records.read_record(path, schema, "the report leaves out what it held",
                                missing_ok=True) or {}
    except ImagefitError as error:
        warnings.warn(str(error), ImagefitWarning, stacklevel=2)
        return {}


def sections_of(summary: dict, run_dir: Path) -> dict:
    """A summary dict (dataset or interpretation) as facts, tables and figures: scalars and
    small mappings become facts, lists of mappings become tables."""
    facts, tables, figures = [], [], []
    for key, value in summary.items():
        if value in ([], {}, None, ""):
            continue
        if key == "plots":
            figures = [f for f in (_figure(run_dir, p["file"], p["title"]) for p in value) if f]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append(table_section(key.replace("_", " ").capitalize(), value))
        elif isinstance(value, dict):
            if value and all(isinstance(v, dict) for v in value.values()):
                rows = [{"": k, **v} for k, v in value.items()]
                tables.append(table_section(key.replace("_", " ").capitalize(), rows))
            else:
                facts.append((key.replace("_", " "), format_value(value)))
        elif not isinstance(value, list) or len(value) <= 12:
            facts.append((key.replace("_", " "), format_value(value)))
    return {"facts": facts, "tables": tables, "plots": figures}


def _metrics_table(metrics: dict) -> dict:
    """Final metrics: one row per metric, a column per split, with and without TTA."""
    prefixes = [("valid_", "valid"), ("valid_tta_", "valid + TTA"), ("test_", "test"),
                ("test_tta_", "test + TTA")]
    present = [(p, label) for p, label in prefixes
               if any(k.startswith(p) and not k.startswith(p + "tta_") for k in metrics)]
    names = list(dict.fromkeys(
        k.removeprefix(p) for p, _ in present for k in metrics
        if k.startswith(p) and not k.removeprefix(p).startswith("tta_")
        and isinstance(metrics[k], (int, float))))
    rows = [{"metric": name, **{label: metrics.get(p + name) for p, label in present}}
            for name in names]
    table = table_section("Final metrics", rows, ["metric", *(label for _, label in present)])
    table["note"] = ("valid: the validation split carved from the training data; test: the "
                     "source's own test split. TTA: the average of each image and its "
                     "augmented versions.")
    return table


def _headline(metrics: dict, kind: str | None) -> str | None:
    if not kind:
        return None
    main = task_class(kind).main_metric
    parts = []
    for prefix, label in (("test_", "test"), ("valid_", "valid")):
        value = metrics.get(prefix + main)
        if isinstance(value, (int, float)):
            tta = metrics.get(f"{prefix}tta_{main}")
            text = f"{label} {main} {value:.4f}"
            if isinstance(tta, (int, float)):
                text += f" ({tta:.4f} with TTA)"
            parts.append(text)
    return " · ".join(parts) or None


def build_context(run_dir: Path) -> dict:
    config = read_run_mapping(run_dir / "config.yaml")
    metrics = read_run_mapping(run_dir / "metrics.json", run_records.MetricsRecord)
    info = read_run_mapping(run_dir / runs.MODEL_INFO)
    task = info.get("task") if isinstance(info.get("task"), dict) else {}
    kind = task.get("kind") or metrics.get("task")
    history = read_run_file(run_dir / "metrics.csv", pd.read_csv)
    dataset = read_run_mapping(run_dir / DATA_SUMMARY)
    interpretation = read_run_mapping(run_dir / INTERPRETATION)

    epochs_table = None
    if history is not None and len(history):
        epochs_table = table_section("Per epoch", history.to_dict("records"))
    training_plots = [f for f in (_figure(run_dir, f"plots/{name}", title)
                                  for name, title in TRAINING_PLOTS) if f]
    interpretation_context = None
    if interpretation:
        shown = {k: v for k, v in interpretation.items()
                 if k not in ("metrics", "confusion", "split", "n_images", "n_texts",
                              "top_paths", "feature_maps")}
        maps = interpretation.get("feature_maps")
        texts = "n_texts" in interpretation
        interpretation_context = {"split": interpretation.get("split", "valid"),
                                  "n_images": interpretation.get(
                                      "n_texts" if texts else "n_images", 0),
                                  "item_word": "texts" if texts else "images",
                                  "feature_maps": _figure(run_dir, maps["file"], maps["title"])
                                  if maps else None,
                                  **sections_of(shown, run_dir)}
    seconds = metrics.get("seconds")
    return {
        "title": run_dir.name,
        "data": config.get("data_description") or config.get("data") or "-",
        "task_kind": " ".join(filter(None, [INPUTS.get(info.get("input"), ImageInput).qualifier,
                                            kind])) or "-",
        "model": info.get("architecture") or config.get("model") or "-",
        "epochs": metrics.get("epochs", len(history) if history is not None else 0),
        "seconds": f"{seconds:.0f} s" if isinstance(seconds, (int, float)) else "-",
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(
            (run_dir / "config.yaml").stat().st_mtime)) if (run_dir / "config.yaml").is_file()
        else "",
        "headline": _headline(metrics, kind),
        "interrupted": bool(metrics.get("interrupted")),
        "config": [(k, format_value(v)) for k, v in config.items()],
        "model_summary": read_run_file(run_dir / runs.MODEL_SUMMARY, Path.read_text),
        "torchinfo_missing": find_spec("torchinfo") is None,
        "dataset": sections_of(dataset, run_dir) if dataset else None,
        "training": {"plots": training_plots, "epochs": epochs_table},
        "metrics": _metrics_table(metrics),
        "interpretation": interpretation_context,
        "version": __version__,
    }


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise ImagefitError(f"run {run_dir} not found: give a run directory made by imagefit fit")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.json").is_file():
        raise ImagefitError(f"{run_dir} is not a run directory (no config.yaml or "
                            "metrics.json): give a folder made by imagefit fit")


def write_report(run_dir: str | Path) -> Path:
    """Render report.html from the files in ``run_dir``."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    html = environment.get_template("report.html").render(**build_context(run_dir))
    path = run_dir / REPORT
    runs.write_atomic(path, html)
    return path


def regenerate(run_dir: str | Path) -> Path:
    """Redraw the training and interpretation plots and the model summary from the run's
    files, then the page."""
    from .interpretation import redraw_interpretation
    from .model_summary import save_model_summary

    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    history = read_run_file(run_dir / "metrics.csv", pd.read_csv)
    steps = read_run_file(run_dir / "steps.csv", pd.read_csv)
    if history is not None and len(history):
        rows = history.to_dict("records")
        save_metrics_plot(rows, run_dir / "plots" / "epochs.png")
        if steps is not None and len(steps):
            steps = steps.astype(object).where(steps.notna(), None)
            save_training_plot(steps.to_dict("records"), rows,
                               run_dir / "plots" / "training.png")
    try:
        redraw_interpretation(run_dir)
    except ImagefitError as error:  # a damaged file read through run_records.read_record
        warnings.warn(f"{error}; the report leaves the interpretation out", ImagefitWarning,
                      stacklevel=2)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"the interpretation files of {run_dir} are damaged "
                      f"({type(error).__name__}): the report leaves the interpretation out; a "
                      "new fit writes them again", ImagefitWarning, stacklevel=2)
    if (run_dir / runs.MODEL_INFO).is_file() and (run_dir / runs.MODEL_WEIGHTS).is_file():
        try:
            save_model_summary(run_dir)
        except ImagefitError as error:  # the model cannot be loaded: the page goes on without
            warnings.warn(f"{error}; the report leaves the model summary out", ImagefitWarning,
                          stacklevel=2)
    return write_report(run_dir)
