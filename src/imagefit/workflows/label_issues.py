"""``imagefit label-issues CV_DIR``: the training images most likely mislabelled, from a
CV's out-of-fold probabilities (``evaluation.label_issues``, cleanlab's confident learning),
with outliers and near-duplicates (cleanlab's Datalab), written beside the CV
(label_issues.csv, label_issues.json, features.npy, a grid of the top suspects) and shown in
its report. ``imagefit fit --drop-rows/--relabel label_issues.csv`` acts on it.

Datalab finds both among nearest neighbours, so every row's features must lie in one space.
Each row's features from its own out-of-fold model do not: each fold model has its own
space, and a copy in another fold than its original was no nearer to it than other digits.
Images are compared as thumbnails (at most 16 pixels a side, less their mean; no forward
pass); texts, which have no pixels, as every fold model's features side by side (a forward
pass per fold, k times one model's width; the mean of un-aligned models' features is no
space). bench/data_issue_features.py chose the thumbnails, on the digits of
tests/test_label_issues.py with planted copies and odd images, 2 seeds: they found 6/6
copies and 4/5 altered ones (JPEG, darker, noisier, blurred; not a 1-pixel shift) with no
other row called a duplicate, and ranked the 8 noise and odd images the 8 most outlying
with 4 other rows flagged. The fold models side by side found 6/6 and 2/5, ranked the odd
images down to 8th (seed 0) and 32nd (seed 1) and flagged 28 and 26 other rows; the all-data
model (--train-on-all) 6/6 and 1/5 or 3/5, down to 13th and 31st, 34 and 47 others; about two
in five of those others had a label planted wrong, which the models had trained on. Each
row's own fold model (before): 3/6 copies, 0/5 altered, 4/8 and 1/8 odd images flagged.
Thumbnails see what looks out of place (blank, noise, corrupt, inverted), not a well-formed
picture of the wrong subject."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import run_records, runs
from ..config import CVConfig, LabelIssuesOptions, make_options
from ..data.cache import CacheSettings
from ..data.inputs import table_input
from ..data.prepare import prepare_images
from ..data.sources import read_source
from ..errors import ImagefitError
from ..evaluation.inference import load_model
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
FEATURES = "features.npy"  # what Datalab compared, in oof.csv's row order
THUMBNAIL = 16  # pixels a side of the images Datalab compares
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
    task = Task.from_dict(run_records.read_model_info(cv_dir / "fold_0")["task"])
    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"label": str, "labels": str, "path": str,
                                                  "predicted": str}, keep_default_na=False)
    issues = find_label_issues(oof, task, options.method, options.filter_by)
    images = cv_images(cv_dir, options)
    summary = {"method": options.method, "filter_by": issues.extra["filter_by"],
               "rows": issues.n_rows, "flagged": len(issues.frame), "task": task.kind,
               "pairs": issues.pairs, "csv": ISSUES_CSV}
    if isinstance(images, np.ndarray) and options.shown and len(issues.frame):
        _save_suspects(images, issues.frame.head(options.shown), cv_dir / ISSUES_PLOT)
        summary["plot"] = ISSUES_PLOT
    if options.data_issues and images is not None:
        features = data_features(cv_dir, oof, images, task)
        np.save(cv_dir / FEATURES, features)  # row i of oof.csv: for other tools too
        summary["features"] = FEATURES
        summary["features_of"] = ("the fold models' features side by side"
                                  if isinstance(images, list) else "image thumbnails")
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


def cv_images(cv_dir: Path, options: LabelIssuesOptions) -> np.ndarray | list[str] | None:
    """The CV data's images as its folds saw them (the cache at their size), its texts for a
    text CV, or None for in-memory data, which cannot be read again."""
    values = run_records.read_config(cv_dir, "restore it from a copy of the CV directory, or run "
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
    if not table_input(table).reads_images:  # each fold model encodes them with its own characters
        return table.texts
    info = run_records.read_model_info(cv_dir / "fold_0")
    settings = CacheSettings(int(info["image_size"]) if not cfg.image_sizes else
                             int(max(cfg.image_sizes)), int(info["channels"]),
                             info.get("resize", "crop"))
    return prepare_images(table, settings, cache_dir=cfg.cache_dir, strict=False,
                          progress=cfg.progress).cache.images


def data_features(cv_dir: Path, oof: pd.DataFrame, images: np.ndarray | list[str],
                  task: Task) -> np.ndarray:
    """One feature space for every row of oof.csv, in its order, so that Datalab's
    nearest neighbours compare like with like: pixel thumbnails of images, every fold
    model's features side by side for texts."""
    rows = oof["row"].to_numpy()
    if isinstance(images, list):
        return fold_model_features(cv_dir, sorted(set(oof["fold"])), images, rows, task)
    return thumbnail_features(images, rows)


def thumbnail_features(images: np.ndarray, rows: np.ndarray,
                       batch_size: int = 1024) -> np.ndarray:
    """Each image (uint8 NHWC) area-averaged to at most THUMBNAIL pixels a side, less its
    mean: no model, so copies match whichever fold they sit in, and a brighter or darker
    copy matches too (Datalab's cosine distance ignores contrast)."""
    parts = []
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(images[rows[start:start + batch_size]]).permute(0, 3, 1, 2)
        side = (min(THUMBNAIL, batch.shape[2]), min(THUMBNAIL, batch.shape[3]))
        flat = nn.functional.adaptive_avg_pool2d(batch.float() / 255, side).flatten(1)
        parts.append(flat - flat.mean(1, keepdim=True))
    return torch.cat(parts).numpy()


def fold_model_features(cv_dir: Path, folds: list[int], texts: list[str], rows: np.ndarray,
                        task: Task) -> np.ndarray:
    """Every fold model's features (the input of its last linear layer) of every row, side
    by side: one space for all rows, where each row's own fold model alone would give each
    fold its own. A forward pass per fold over all the rows, k times one model's width."""
    parts = []
    for fold in folds:
        loaded = load_model(cv_dir / f"fold_{int(fold)}")
        last = [m for m in loaded.model.modules() if isinstance(m, nn.Linear)][-1]
        seen: list[torch.Tensor] = []
        hook = last.register_forward_hook(
            lambda module, args, out, seen=seen: seen.append(args[0].float()))
        try:
            model_outputs(loaded.model, loaded.pipeline, task, loaded.input.encode(texts),
                          rows, 256, precision=loaded.precision)
        finally:
            hook.remove()
        parts.append(torch.cat(seen).flatten(1).cpu().numpy())
    return np.concatenate(parts, axis=1)


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
