"""Label issues on Fashion-MNIST: how many planted label flips a 5-fold CV and cleanlab find
(precision and recall of the flagged set), against ranking the out-of-fold losses alone (the
report's top losses), and what acting on them buys: clean test accuracy after
`--drop-rows` of the flagged images, against training on every noisy row and against
`--plc`, medians of 3 seeds.

The data: 10,000 of the official training images (class-balanced, seeded) with 5% and 20%
of their labels moved to another class (seeded); the official 10,000 test images keep their
clean labels and give the figure (nothing is chosen on them). The CV uses the small-image
recipe with its wider net (small_cnn_32, 15 epochs: augmentation and flip TTA on; its
out-of-fold accuracy decides how many of the model's own errors look like label errors);
the fits use imagefit's defaults.

    .venv/bin/python bench/label_issues.py [--noise 0.05 0.2] [--seeds 0 1 2] [--epochs 10]
        [--cv-model small_cnn_32] [--cv-epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from common import write_result

import imagefit
from imagefit.config import SourceOptions
from imagefit.data.sources import read_source

TRAIN = 10_000


def noisy_table(noise: float, seed: int = 0):
    """A class-balanced, seeded subset of the official training images with ``noise`` of
    their labels moved to another class (seeded), the official test images clean; and the
    rows flipped. (bench/noisy_labels.py draws its noise in another order: the figures here
    come from this one.)"""
    table = read_source("builtin:fashion-mnist", SourceOptions(progress=False))
    rng = np.random.default_rng(seed)
    targets = np.asarray(table.targets)
    train = np.flatnonzero(table.split == "train")
    per_class = TRAIN // len(table.task.names)
    chosen = np.concatenate([rng.permutation(train[targets[train] == c])[:per_class]
                             for c in range(len(table.task.names))])
    rows = np.sort(np.concatenate([chosen, np.flatnonzero(table.split == "test")]))
    subset = table.subset(rows)
    noisy = np.asarray(subset.targets).copy()
    train_rows = np.flatnonzero(subset.split == "train")
    flipped = np.sort(rng.choice(train_rows, size=round(noise * len(train_rows)),
                                 replace=False))
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, len(flipped))) % 10
    return (replace(subset, targets=noisy, description=f"fashion-mnist {TRAIN}, "
                    f"{noise:.0%} flipped"), flipped)


def flagged_on_cv(table, flipped: np.ndarray, runs_dir: str, model: str, epochs: int):
    """A 5-fold CV of ``table`` and its label issues (imagefit's default rule), with every
    cleanlab rule's precision and recall on the same out-of-fold predictions."""
    cv = imagefit.cv(table, folds=5, valid_pct=0, progress=False, report=False, model=model,
                     epochs=epochs, runs_dir=runs_dir)
    found = imagefit.label_issues(cv.cv_dir, progress=False, data_issues=False)
    return cv, found, other_filters(cv.cv_dir, table, set(flipped.tolist()))


def precision_recall(flagged: set, flipped: set) -> dict:
    hits = len(flagged & flipped)
    return {"flagged": len(flagged), "hits": hits,
            "precision": round(hits / max(len(flagged), 1), 4),
            "recall": round(hits / max(len(flipped), 1), 4)}


def top_loss_rows(cv_dir: Path, names: list[str], count: int) -> set:
    """The ``count`` rows whose out-of-fold loss (-log p of the given label) is largest."""
    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"label": str})
    probs = oof[[f"prob_{n}" for n in names]].to_numpy()
    given = oof["label"].map({n: i for i, n in enumerate(names)}).to_numpy()
    loss = -np.log(np.clip(probs[np.arange(len(oof)), given], 1e-12, None))
    return set(oof["row"].to_numpy()[np.argsort(-loss, kind="stable")[:count]].tolist())


def other_filters(cv_dir: Path, table, flipped: set) -> dict:
    """Precision and recall of cleanlab's other flagging rules on the same predictions."""
    from cleanlab.filter import find_label_issues

    from imagefit.evaluation.label_issues import FILTERS, given_labels, oof_probabilities

    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"label": str})
    probs, labels = oof_probabilities(oof, table.task), given_labels(oof, table.task)
    rows = oof["row"].to_numpy()
    return {rule: precision_recall(set(rows[find_label_issues(labels, probs,
                                                              filter_by=rule)].tolist()),
                                   flipped) for rule in FILTERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", nargs="+", type=float, default=[0.05, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--cv-model", default="small_cnn_32")
    parser.add_argument("--cv-epochs", type=int, default=15)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for noise in args.noise:
            table, flipped = noisy_table(noise)
            started = time.perf_counter()
            cv, found, rules = flagged_on_cv(table, flipped, runs_dir, args.cv_model,
                                             args.cv_epochs)
            cv_seconds = time.perf_counter() - started
            flagged = set(found.issues.frame["row"].tolist())
            names = list(table.task.names)
            entry = {"noise": noise, "flipped": len(flipped),
                     "cv_seconds": round(cv_seconds, 1),
                     "oof_accuracy": round(cv.summary["oof"]["accuracy"], 4),
                     "cleanlab": precision_recall(flagged, set(flipped.tolist())),
                     "top_loss": precision_recall(top_loss_rows(cv.cv_dir, names,
                                                                len(flagged)),
                                                  set(flipped.tolist())),
                     "other_filters": rules,
                     "fits": {}}
            print(f"noise {noise:.0%}: cleanlab {entry['cleanlab']}, top loss "
                  f"{entry['top_loss']}", flush=True)
            csv = str(cv.cv_dir / "label_issues.csv")
            variants = {"all noisy rows": {}, "--drop-rows flagged": {"drop_rows": csv},
                        "--plc": {"plc": True}}
            for name, extra in variants.items():
                accuracies, seconds = [], []
                for seed in args.seeds:
                    began = time.perf_counter()
                    fit = imagefit.fit(table, seed=seed, epochs=args.epochs, valid_pct=0.1,
                                       progress=False, report=False, runs_dir=runs_dir,
                                       **extra)
                    seconds.append(round(time.perf_counter() - began, 1))
                    accuracies.append(round(fit.metrics["test_accuracy"], 4))
                    print(f"  {name} seed {seed}: {accuracies[-1]:.4f}", flush=True)
                entry["fits"][name] = {"test_accuracy": accuracies, "seconds": seconds,
                                       "median": statistics.median(accuracies),
                                       "spread": round(max(accuracies) - min(accuracies), 4),
                                       **({"dropped": fit.metrics["label_edits"]["dropped"]}
                                          if "drop_rows" in extra else {})}
            results.append(entry)
            write_result("label_issues", {
                "command": f"bench/label_issues.py --noise {' '.join(map(str, args.noise))} "
                           f"--seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs} "
                           f"--cv-model {args.cv_model} --cv-epochs {args.cv_epochs}",
                "cv": {"model": args.cv_model, "epochs": args.cv_epochs, "folds": 5,
                       "filter_by": "low_self_confidence", "method": "self_confidence"},
                "data": f"Fashion-MNIST: {TRAIN} training images (class-balanced, seeded), "
                        "a share of their labels moved to another class (seeded); the "
                        "official 10,000 test images clean",
                "results": results})


if __name__ == "__main__":
    main()
