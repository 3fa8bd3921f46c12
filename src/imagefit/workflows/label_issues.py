"""``imagefit label-issues CV_DIR``: the training images most likely mislabelled, from a
CV's out-of-fold probabilities (``evaluation.label_issues``, cleanlab's confident learning),
with outliers and near-duplicates from the fold models' penultimate features (Datalab),
written beside the CV (label_issues.csv, label_issues.json, a grid of the top suspects) and
shown in its report. ``imagefit fit --drop-rows/--relabel label_issues.csv`` acts on it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import runs
from ..config import CVConfig, LabelIssuesOptions, make_options
from ..data.cache import CacheSettings
from ..data.prepare import prepare_images
from ..data.sources import read_source
from ..errors import ImagefitError
from ..evaluation.inference import encode_texts, load_model
from ..evaluation.label_issues import (
    LabelIssues,
    data_issues,
    find_label_issues,
    require_cleanlab,
)
from ..forward import model_outputs
from ..tasks import Task

ISSUES_CSV = "label_issues.csv"
ISSUES_JSON = "label_issues.json"
ISSUES_PLOT = "plots/label_issues.png"
FEATURES = "features.npy"  # penultimate-layer features, in oof.csv's row order
DATA_ISSUES_SHOWN = 10
RECORDED = ("data", "data_description", "batch_size_used", "devices")


@dataclass
class LabelIssuesResult:
    """The flagged rows (ranked), the summary written to label_issues.json, and the CSV."""

    issues: LabelIssues
    summary: dict
    csv: Path


def label_issues(cv_dir: str | Path, out: str | Path | None = None,
                 options: LabelIssuesOptions | None = None) -> LabelIssuesResult:
    """Find, write and report the label issues of the CV in ``cv_dir``."""
    options = options or LabelIssuesOptions()
    cv_dir = Path(cv_dir)
    if not (cv_dir / "oof.csv").is_file() or not (cv_dir / "fold_0").is_dir():
        raise ImagefitError(f"{cv_dir} is not a CV directory (no oof.csv and fold_0/): give a "
                            "folder written by imagefit cv")
    require_cleanlab()
    from ..report.cv_report import read_cv_info, write_cv_report

    read_cv_info(cv_dir)  # its report is written last: a damaged cv.json fails before the work
    task = Task.from_dict(runs.read_model_info(cv_dir / "fold_0")["task"])
    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"label": str, "labels": str, "path": str,
                                                  "predicted": str}, keep_default_na=False)
    issues = find_label_issues(oof, task, options.method, options.filter_by)
    images = _cv_images(cv_dir, options)
    summary = {"method": options.method, "filter_by": issues.extra["filter_by"],
               "rows": issues.n_rows, "flagged": len(issues.frame), "task": task.kind,
               "pairs": issues.pairs, "csv": ISSUES_CSV}
    if isinstance(images, np.ndarray) and options.shown and len(issues.frame):
        _save_suspects(images, issues.frame.head(options.shown), cv_dir / ISSUES_PLOT)
        summary["plot"] = ISSUES_PLOT
    if options.data_issues and images is not None:
        features = penultimate_features(cv_dir, oof, images, task)
        np.save(cv_dir / FEATURES, features)  # row i of oof.csv: for other tools too
        summary["features"] = FEATURES
        found = data_issues(features)
        summary.update(_data_issue_rows(found, oof))
    csv = cv_dir / ISSUES_CSV
    runs.write_atomic(csv, issues.frame.to_csv(index=False))
    runs.save_json(cv_dir / ISSUES_JSON, summary)
    if out is not None and Path(out).resolve() != csv.resolve():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(csv, out)
    write_cv_report(cv_dir)
    return LabelIssuesResult(issues, summary, Path(out) if out else csv)


def _cv_images(cv_dir: Path, options: LabelIssuesOptions) -> np.ndarray | list[str] | None:
    """The CV data's images as its folds saw them (the cache at their size), its texts for a
    text CV, or None for in-memory data, which cannot be read again."""
    values = runs.read_config(cv_dir, "restore it from a copy of the CV directory, or run "
                              "imagefit cv again") or {}
    data = values.get("data")
    if not data:
        return None
    cfg = make_options(CVConfig, {k: v for k, v in values.items()
                                  if k not in RECORDED and k in CVConfig.model_fields})
    if options.cache_dir:
        cfg.cache_dir = options.cache_dir
    cfg.progress = options.progress
    table = read_source(data, cfg)
    if table.texts is not None:  # each fold model encodes them with its own characters
        return table.texts
    info = runs.read_model_info(cv_dir / "fold_0")
    settings = CacheSettings(int(info["image_size"]) if not cfg.image_sizes else
                             int(max(cfg.image_sizes)), int(info["channels"]),
                             info.get("resize", "crop"))
    return prepare_images(table, settings, cache_dir=cfg.cache_dir, strict=False,
                          progress=cfg.progress).cache.images


def penultimate_features(cv_dir: Path, oof: pd.DataFrame, images: np.ndarray | list[str],
                         task: Task) -> np.ndarray:
    """Each out-of-fold row's features before the last linear layer of the fold model that
    did not train on it: one forward pass per fold (texts encoded as that model reads
    them)."""
    features: np.ndarray | None = None
    texts = images if isinstance(images, list) else None
    tensor = None if texts is not None else torch.from_numpy(images)
    for fold, part in oof.groupby("fold"):
        loaded = load_model(cv_dir / f"fold_{int(fold)}")
        if texts is not None:
            tensor = encode_texts(loaded, texts)
        last = [m for m in loaded.model.modules() if isinstance(m, nn.Linear)][-1]
        seen: list[torch.Tensor] = []
        hook = last.register_forward_hook(
            lambda module, args, out, seen=seen: seen.append(args[0].float()))
        try:
            model_outputs(loaded.model, loaded.pipeline, task, tensor,
                          np.array(part["row"]), 256, precision=loaded.precision)
        finally:
            hook.remove()
        values = torch.cat(seen).flatten(1).cpu().numpy()
        if features is None:
            features = np.zeros((len(oof), values.shape[1]), dtype=np.float32)
        features[part.index.to_numpy()] = values
    return features


def _data_issue_rows(found: dict[str, pd.DataFrame], oof: pd.DataFrame) -> dict:
    where = oof["path"].to_numpy() if "path" in oof else oof["row"].to_numpy()
    result = {}
    for kind, flag, score in (("outliers", "is_outlier_issue", "outlier_score"),
                              ("near_duplicates", "is_near_duplicate_issue",
                               "near_duplicate_score")):
        frame = found["outlier" if kind == "outliers" else "near_duplicate"]
        flagged = frame.index[frame[flag]].to_numpy()
        order = flagged[np.argsort(frame[score].to_numpy()[flagged], kind="stable")]
        rows = []
        for i in order[:DATA_ISSUES_SHOWN]:
            row = {"row": int(oof["row"].iloc[i]), "image": str(where[i]),
                   "score": round(float(frame[score].iloc[i]), 4)}
            if kind == "near_duplicates" and "near_duplicate_sets" in frame:
                row["near"] = ", ".join(str(where[j]) for j in
                                        list(frame["near_duplicate_sets"].iloc[i])[:3])
            rows.append(row)
        result[kind] = rows
        result[f"{kind}_count"] = int(len(flagged))
    return result


def _save_suspects(images: np.ndarray, frame: pd.DataFrame, path: Path) -> None:
    from ..report.plots import save_image_grid

    shown = torch.from_numpy(images[frame["row"].to_numpy()]).permute(0, 3, 1, 2)
    titles = [f"{g} -> {s}\nscore {v:.2f}" for g, s, v in
              zip(frame["given"], frame["suggested"], frame["score"])]
    save_image_grid(shown.float() / 255, titles, path, columns=min(8, len(frame)),
                    title="most likely mislabelled: given -> suggested")


def format_issues(result: LabelIssuesResult) -> str:
    frame = result.issues.frame
    lines = [f"{len(frame)} of {result.issues.n_rows} training images flagged "
             f"({result.issues.method})"]
    for row in frame.head(10).itertuples():
        where = row.path or getattr(row, "text", "") or f"row {row.row}"
        lines.append(f"{row.rank:>4}  {row.score:.3f}  {row.given} -> {row.suggested}  {where}")
    if "outliers_count" in result.summary:
        lines.append(f"outliers: {result.summary['outliers_count']}, near-duplicates: "
                     f"{result.summary['near_duplicates_count']}")
    return "\n".join(lines)
