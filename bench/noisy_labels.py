"""Noisy labels on Fashion-MNIST: plain training, soft labels from 5-fold out-of-fold
predictions, and Progressive Label Correction, same model, epochs and options.

The data: a seeded, class-balanced subset of the official training images (20,000 by
default) of which 40% get a label drawn uniformly from the other nine classes (seeded; the
noise is the same for every method and seed); the validation split is carved from these noisy
rows, as in real life; the official 10,000 test images keep their clean labels and give the
figure. Nothing is chosen on them. Soft labels' k-fold training is counted and reported
beside their accuracy.

    .venv/bin/python bench/noisy_labels.py [--train 20000] [--epochs 10] [--seeds 0 1 2]
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
from imagefit.workflows.cv import cv

NOISE = 0.4


def noisy_table(n_train: int, noise_seed: int = 0):
    """The subset with 40% of its training labels replaced, and the clean labels."""
    table = read_source("builtin:fashion-mnist", SourceOptions(progress=False))
    rng = np.random.default_rng(noise_seed)
    targets = np.asarray(table.targets)
    train = np.flatnonzero(table.split == "train")
    per_class = n_train // len(table.task.names)
    chosen = np.concatenate([rng.permutation(train[targets[train] == c])[:per_class]
                             for c in range(len(table.task.names))])
    rows = np.sort(np.concatenate([chosen, np.flatnonzero(table.split == "test")]))
    subset = table.subset(rows)
    clean = np.asarray(subset.targets).copy()
    noisy = clean.copy()
    train_rows = np.flatnonzero(subset.split == "train")
    flipped = rng.choice(train_rows, size=round(NOISE * len(train_rows)), replace=False)
    noisy[flipped] = (clean[flipped] + rng.integers(1, 10, len(flipped))) % 10
    described = f"fashion-mnist {len(train_rows)} train, {NOISE:.0%} noisy"
    return replace(subset, targets=noisy, description=described), clean, flipped


def plc_quality(run_dir: Path, clean: np.ndarray, flipped: np.ndarray) -> dict:
    """How many of PLC's final corrections restored the clean label."""
    path = run_dir / "corrected_labels.csv"
    if not path.is_file():
        return {}
    frame = pd.read_csv(path)
    names = imagefit.evaluation.inference.load_model(run_dir, "cpu").task.names
    corrected = frame["corrected"].map(names.index).to_numpy()
    right = corrected == clean[frame["row"].to_numpy()]
    return {"changed": len(frame), "changed_to_clean": int(right.sum()),
            "noisy_rows_fixed": int(np.isin(frame["row"][right], flipped).sum()),
            "noisy_rows": len(flipped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--soft-alpha", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=["plain", "plc", "soft_labels"])
    parser.add_argument("--name", default="noisy_labels")
    args = parser.parse_args()
    table, clean, flipped = noisy_table(args.train)
    common = dict(epochs=args.epochs, valid_pct=0.1, progress=False, tta=False, report=False)
    results: dict = {method: {"test_accuracy": [], "seconds": []} for method in args.methods}

    def record(method: str, seed: int, metrics: dict, seconds: float, **extra) -> None:
        entry = results[method]
        entry["test_accuracy"].append(round(metrics["test_accuracy"], 4))
        entry["seconds"].append(round(seconds, 1))
        for key, value in extra.items():
            entry.setdefault(key, []).append(value)
        accuracies = entry["test_accuracy"]
        entry["median"] = statistics.median(accuracies)
        entry["spread"] = round(max(accuracies) - min(accuracies), 4)
        print(f"{method} seed {seed}: test accuracy {accuracies[-1]:.4f} ({seconds:.0f} s)",
              flush=True)
        write_result(args.name, {
            "command": f"bench/noisy_labels.py --train {args.train} --epochs {args.epochs} "
                       f"--seeds {' '.join(map(str, args.seeds))} --folds {args.folds} "
                       f"--soft-alpha {args.soft_alpha}",
            "data": f"Fashion-MNIST: {args.train} training images (class-balanced, seeded), "
                    f"{NOISE:.0%} of their labels replaced by another class; validation "
                    "(10%) carved from the noisy rows; the official 10,000 test images clean",
            "options": {**common, "model": "small_cnn (default)"},
            "results": results,
        })

    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in args.seeds:
            if "plain" in args.methods:
                started = time.perf_counter()
                result = imagefit.fit(table, seed=seed, runs_dir=runs_dir, **common)
                record("plain", seed, result.metrics, time.perf_counter() - started)
            if "plc" in args.methods:
                started = time.perf_counter()
                result = imagefit.fit(table, seed=seed, runs_dir=runs_dir, plc=True, **common)
                record("plc", seed, result.metrics, time.perf_counter() - started,
                       corrections=plc_quality(result.run_dir, clean, flipped))
            if "soft_labels" in args.methods:
                started = time.perf_counter()
                folds = cv(table, folds=args.folds, seed=seed, runs_dir=runs_dir,
                           **{k: v for k, v in common.items() if k != "valid_pct"})
                cv_seconds = time.perf_counter() - started
                result = imagefit.fit(table, seed=seed, runs_dir=runs_dir,
                                      soft_labels=str(folds.cv_dir),
                                      soft_alpha=args.soft_alpha, **common)
                record("soft_labels", seed, result.metrics, time.perf_counter() - started,
                       kfold_seconds=round(cv_seconds, 1),
                       oof_accuracy_vs_noisy_labels=round(folds.summary["oof"]["accuracy"],
                                                          4))


if __name__ == "__main__":
    main()
