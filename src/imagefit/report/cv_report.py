"""report.html of a CV directory: the folds, the mean and spread, the out-of-fold
interpretation; rendered with autoescaping like the run report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import run_records, runs
from ..tasks import KINDS, task_class
from .html import environment, read_run_file, read_run_mapping, sections_of, table_section


class CVRecord(BaseModel):
    """What the CV report reads from cv.json (other keys are kept as they are)."""

    model_config = ConfigDict(extra="allow")

    task: str
    folds: int = Field(ge=2)
    fold_method: str
    runs: list[str] = Field(min_length=1)
    mean: dict[str, float]
    std: dict[str, float]
    oof: dict
    seconds: float = 0.0

    @field_validator("task")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}: one of {', '.join(KINDS)}")
        return kind


def read_cv_info(cv_dir: Path) -> dict:
    """A CV directory's cv.json, checked."""
    return run_records.read_record(cv_dir / "cv.json", CVRecord, "restore it from a copy, or run "
                            "imagefit cv again")


def write_cv_report(cv_dir: str | Path) -> Path:
    cv_dir = Path(cv_dir)
    info = read_cv_info(cv_dir)
    config = read_run_mapping(cv_dir / "config.yaml")
    folds = pd.read_csv(cv_dir / "cv_metrics.csv").to_dict("records")
    main = task_class(info["task"]).main_metric
    shown = ["fold", "n_train", "n_valid", "epochs", f"valid_{main}", "valid_loss",
             f"test_{main}", "seconds"]
    fold_table = table_section("Folds", folds, [c for c in shown if c in folds[0]])
    names = list(info["mean"])
    summary_rows = [{"figure": name, "mean": info["mean"][name], "std": info["std"][name],
                     "out-of-fold": info["oof"].get(name.removeprefix("valid_"))
                     if name.startswith("valid_") else None} for name in names]
    interpretation = read_run_mapping(cv_dir / "interpretation.json")
    shown_interpretation = {k: v for k, v in interpretation.items()
                            if k not in ("metrics", "confusion", "split", "n_images",
                                         "top_losses", "top_paths")}
    headline = None
    column = f"valid_{main}"
    if column in info["mean"]:
        headline = (f"{column} {info['mean'][column]:.4f} ± {info['std'][column]:.4f} over "
                    f"{info['folds']} folds")
    issues = label_issues_section(cv_dir)
    html = environment.get_template("cv_report.html").render(
        title=cv_dir.name, data=config.get("data_description") or config.get("data") or "-",
        task_kind=info["task"], k=info["folds"], method=info["fold_method"],
        seconds=f"{info.get('seconds', 0):.0f} s", headline=headline, folds=fold_table,
        runs=info["runs"], summary=table_section("Summary", summary_rows),
        interpretation=sections_of(shown_interpretation, cv_dir), issues=issues)
    path = cv_dir / "report.html"
    runs.write_atomic(path, html)
    return path


def label_issues_section(cv_dir: Path) -> dict | None:
    """The label issues (``imagefit label-issues``) as facts, tables and the grid of
    suspects, when the CV has them."""
    info = read_run_mapping(cv_dir / "label_issues.json")
    if not info:
        return None
    frame = read_run_file(cv_dir / info.get("csv", "label_issues.csv"), lambda p: pd.read_csv(
        p, keep_default_na=False, dtype={"path": str, "given": str, "suggested": str}))
    top = frame.head(20).to_dict("records") if frame is not None else []
    rule = info.get("filter_by", "low_self_confidence")
    shown = {"method": f"{info['method']} (flagged by {rule})",
             "flagged": f"{info['flagged']} of {info['rows']} training images",
             "most likely mislabelled": [{k: r.get(k) for k in ("rank", "path", "row",
                                                              "given", "suggested", "score")
                                          if k != "path" or r.get("path")} for r in top],
             "estimated errors by class pair (confident joint)": info.get("pairs", [])}
    for kind in ("outliers", "near_duplicates"):
        if f"{kind}_count" in info:
            compared = f" on {info['features_of']}" if "features_of" in info else ""
            shown[f"{kind} (Datalab{compared})"] = info[f"{kind}_count"]
            shown[f"{kind.replace('_', ' ')} shown"] = info[kind]
    if info.get("plot"):
        shown["plots"] = [{"file": info["plot"],
                           "title": "Most likely mislabelled: given -> suggested, score"}]
    return sections_of(shown, cv_dir)
