"""The char-CNN (`imagefit fit --task text`, its defaults, for 5 and for 10 epochs) against a
scikit-learn baseline on the gender-guesser names (builtin:names, ~36,000 given names marked
male or female): the same seeded, stratified 80/20 split per seed, accuracy on the 20%, and
seconds taken, for each of 3 seeds; the baseline is TF-IDF over character 1-4-grams and
logistic regression, its C chosen by 3-fold CV on the 80%.

    .venv/bin/python bench/text.py [--seeds 0 1 2] [--epochs 5 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from common import write_result
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline

import imagefit
from imagefit.data.builtin import read_names
from imagefit.data.table import Table


def split_rows(table: Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(table))
    return train_test_split(rows, test_size=0.2, random_state=seed, stratify=table.targets)


def baseline(table: Table, train: np.ndarray, held: np.ndarray, seed: int) -> dict:
    started = time.perf_counter()
    texts = np.array(table.texts, dtype=object)
    model = GridSearchCV(
        make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 4), lowercase=True,
                                      sublinear_tf=True),
                      LogisticRegression(max_iter=2000)),
        {"logisticregression__C": [1.0, 3.0, 10.0, 30.0]}, cv=3, n_jobs=1)
    model.fit(texts[train], table.targets[train])
    accuracy = float((model.predict(texts[held]) == table.targets[held]).mean())
    return {"accuracy": accuracy, "seconds": round(time.perf_counter() - started, 1),
            "C": model.best_params_["logisticregression__C"]}


def char_cnn(table: Table, train: np.ndarray, held: np.ndarray, seed: int,
             epochs: int) -> dict:
    split = np.full(len(table), "train", dtype=object)
    split[held] = "test"
    data = Table(table.task, table.targets, split, texts=table.texts,
                 description="builtin:names 80/20")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs_dir:
        result = imagefit.fit(data, epochs=epochs, valid_pct=0.0, seed=seed, report=False,
                              progress=False, runs_dir=runs_dir)
    return {"accuracy": result.metrics["test_accuracy"],
            "seconds": round(time.perf_counter() - started, 1),
            "train_seconds": result.metrics["train_seconds"],
            "length": result.metrics["text"]["length"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 10])
    args = parser.parse_args()
    table = read_names()
    runs = []
    for seed in args.seeds:
        train, held = split_rows(table, seed)
        row = {"seed": seed, "n_train": len(train), "n_held_out": len(held),
               "baseline": baseline(table, train, held, seed)}
        for epochs in args.epochs:
            row[f"char_cnn_{epochs}"] = char_cnn(table, train, held, seed, epochs)
        print(row)
        runs.append(row)
    names = ["baseline", *(f"char_cnn_{epochs}" for epochs in args.epochs)]
    summary = {name: {"median_accuracy": statistics.median(r[name]["accuracy"] for r in runs),
                      "median_seconds": statistics.median(r[name]["seconds"] for r in runs),
                      "wins_every_seed": all(r[name]["accuracy"] > r["baseline"]["accuracy"]
                                             for r in runs)}
               for name in names}
    print(summary)
    write_result("text", {"command": f"bench/text.py --seeds {' '.join(map(str, args.seeds))} "
                                     f"--epochs {' '.join(map(str, args.epochs))}",
                          "n_names": len(table), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
