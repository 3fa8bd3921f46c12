"""Which features Datalab should compare for label-issues' outliers and near-duplicates: on
the data of tests/test_label_issues.py (600 digits as 16-pixel files, 10% of labels moved,
folds given: row i in fold i % 5) with planted copies (3 in their original's fold, 3 in
another, 5 altered: JPEG, a 1-pixel shift, darker, noisier, blurred, in other folds) and
planted oddities (3 images of uniform noise; an inverted digit, a gray square, a checkerboard,
a hollow square, bars), a 5-fold CV with --train-on-all per seed, then Datalab on each
candidate: each row's own fold model (what label-issues did), one fold model for all rows,
the all-data model, the fold models' mean and side by side, and pixel thumbnails.

    .venv/bin/python bench/data_issue_features.py [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import write_result
from PIL import Image, ImageFilter
from torch import nn

import imagefit
from imagefit import run_records
from imagefit.config import LabelIssuesOptions
from imagefit.evaluation.inference import load_model
from imagefit.evaluation.label_issues import data_issues
from imagefit.forward import model_outputs
from imagefit.tasks import Task
from imagefit.workflows.label_issues import cv_images, thumbnail_features

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_label_issues import (  # the test's own data and plants
    CV,
    DIGIT_FILES,
    NOISE_FILES,
    OTHER_FOLD_COPIES,
    SAME_FOLD_COPIES,
    flipped_digits,
)


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=30)
    return Image.open(buffer).convert("L")


ALTERED = {  # name: (original, change), each in another fold than its original
    "a_jpeg.png": (110, jpeg),
    "a_shift.png": (121, lambda im: Image.fromarray(np.roll(np.asarray(im), 1, axis=1))),
    "a_dark.png": (132, lambda im: Image.fromarray((np.asarray(im) * 0.8).astype(np.uint8))),
    "a_noisy.png": (143, lambda im: Image.fromarray((np.asarray(im) + np.random.default_rng(
        5).normal(0, 12, (16, 16))).clip(0, 255).astype(np.uint8))),
    "a_blur.png": (154, lambda im: im.filter(ImageFilter.GaussianBlur(0.6))),
}


def odd_images() -> dict[str, np.ndarray]:
    hollow = np.zeros((16, 16), np.uint8)
    hollow[3:13, 3:13], hollow[5:11, 5:11] = 230, 0
    bars = np.zeros((16, 16), np.uint8)
    bars[::4] = 255
    return {"o_gray.png": np.full((16, 16), 128, np.uint8),
            "o_checker.png": (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8),
            "o_hollow.png": hollow, "o_bars.png": bars}


def planted_data(root: Path, seed: int) -> np.ndarray:
    """The test's files, copies and noise, with the altered copies and odd images; the rows
    whose label was moved."""
    images, labels, flipped = flipped_digits(0.10, seed=seed)
    rows, folds = [], []

    def add(name: str, label: int, fold: int) -> None:
        rows.append({"file": name, "label": f"n{label}"})
        folds.append(fold)

    for i, name in enumerate(DIGIT_FILES):
        Image.fromarray(images[i]).resize((16, 16)).save(root / name)
        add(name, labels[i], i % 5)
    for copies, moved in ((SAME_FOLD_COPIES, 0), (OTHER_FOLD_COPIES, 1)):
        for name, original in copies.items():
            i = DIGIT_FILES.index(original)
            Image.open(root / original).save(root / name)
            add(name, labels[i], (i + moved) % 5)
    for name, (i, change) in ALTERED.items():
        change(Image.open(root / DIGIT_FILES[i])).save(root / name)
        add(name, labels[i], (i + 2) % 5)
    noise = np.random.default_rng(3).integers(0, 256, (len(NOISE_FILES), 16, 16), np.uint8)
    inverted = 255 - np.asarray(Image.open(root / DIGIT_FILES[200]))
    odd = {**dict(zip(NOISE_FILES, noise)), "o_inverted.png": inverted, **odd_images()}
    for k, (name, image) in enumerate(odd.items()):
        Image.fromarray(image).save(root / name)
        add(name, k % 10, k % 5)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    pd.DataFrame({"row": range(len(rows)), "fold": folds}).to_csv(root / "folds.csv",
                                                                   index=False)
    return flipped


def model_features(run_dir: Path, task: Task, images: np.ndarray, rows: np.ndarray
                   ) -> np.ndarray:
    """The input of the run's last linear layer for ``images[rows]``."""
    loaded = load_model(run_dir)
    last = [m for m in loaded.model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda module, args, out: seen.append(args[0].float()))
    model_outputs(loaded.model, loaded.pipeline, task, torch.from_numpy(images), rows, 256,
                  precision=loaded.precision)
    hook.remove()
    return torch.cat(seen).flatten(1).numpy()


def candidates(cv_dir: Path) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    oof = pd.read_csv(cv_dir / "oof.csv", keep_default_na=False)
    task = Task.from_dict(run_records.read_model_info(cv_dir / "fold_0")["task"])
    images = cv_images(cv_dir, LabelIssuesOptions(progress=False))
    rows, folds = oof["row"].to_numpy(), oof["fold"].to_numpy()
    per_fold = [model_features(cv_dir / f"fold_{k}", task, images, rows) for k in range(5)]
    own = np.zeros_like(per_fold[0])
    for k in range(5):
        own[folds == k] = per_fold[k][folds == k]
    raw = images[rows].reshape(len(rows), -1).astype(np.float32) / 255
    return {"each row's own fold model (before)": own,
            "fold 0's model for all rows": per_fold[0],
            "fold 1's model for all rows": per_fold[1],
            "the all-data model (--train-on-all)": model_features(cv_dir / "all", task,
                                                                  images, rows),
            "the fold models' mean": np.mean(per_fold, axis=0),
            "the fold models side by side": np.concatenate(per_fold, axis=1),
            "thumbnails": raw,
            "thumbnails less their mean (chosen)": thumbnail_features(images, rows)}, oof


def score(features: np.ndarray, oof: pd.DataFrame, flipped: set[int]) -> dict:
    found = data_issues(features)
    duplicates, outliers = found["near_duplicate"], found["outlier"]
    place = {Path(p).name: i for i, p in enumerate(oof["path"])}
    pairs = {"copies": {**SAME_FOLD_COPIES, **OTHER_FOLD_COPIES},
             "altered copies": {name: DIGIT_FILES[i] for name, (i, _) in ALTERED.items()}}
    result = {}
    planted = set()
    for kind, copies in pairs.items():
        hits = [name for name, original in copies.items()
                if duplicates["is_near_duplicate_issue"].iloc[place[name]]
                and place[original] in set(duplicates["near_duplicate_sets"].iloc[place[name]])]
        result[f"{kind} found"] = f"{len(hits)}/{len(copies)}"
        planted |= {place[n] for pair in copies.items() for n in pair}
        if kind == "altered copies":
            result["altered found"] = [name[2:-4] for name in hits]
    flagged = set(np.flatnonzero(duplicates["is_near_duplicate_issue"].to_numpy()))
    result["other rows called duplicates"] = len(flagged - planted)
    odd = {place[name] for name in place if name.startswith(("o_", "noise_"))}
    order = np.argsort(outliers["outlier_score"].to_numpy(), kind="stable")
    result["odd images' outlier ranks"] = sorted(
        int(np.flatnonzero(order == i)[0]) + 1 for i in odd)
    flagged = set(np.flatnonzero(outliers["is_outlier_issue"].to_numpy()))
    result["odd images flagged"] = f"{len(flagged & odd)}/{len(odd)}"
    others = flagged - odd
    result["other rows flagged outliers"] = len(others)
    moved = {i for i in others if int(oof["row"].iloc[i]) in flipped}
    result["of which label moved"] = len(moved)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            os.environ.update(IMAGEFIT_CACHE=str(root / "cache"), IMAGEFIT_OFFLINE="1")
            flipped = planted_data(root, seed=2 + seed)
            cv = imagefit.cv(str(root / "labels.csv"), runs_dir=str(root / "runs"),
                             folds_file=str(root / "folds.csv"), train_on_all=True,
                             seed=seed, **CV)
            features, oof = candidates(cv.cv_dir)
            scores = {name: score(values, oof, set(flipped.tolist()))
                      for name, values in features.items()}
        for name, values in scores.items():
            print(seed, f"{name:38s}", values)
        results.append({"seed": seed, "rows": len(oof), "candidates": scores})
    write_result("data_issue_features", {"command": "bench/data_issue_features.py --seeds "
                                         + " ".join(map(str, args.seeds)),
                                         "cv": CV, "results": results})


if __name__ == "__main__":
    main()
