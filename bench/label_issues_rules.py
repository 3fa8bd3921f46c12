"""cleanlab's rules for flagging label issues, compared on the out-of-fold predictions of one
5-fold CV per noise level (the data and CV of bench/label_issues.py): precision and recall
of each rule's flagged set against the planted flips, and of the same number of rows ranked
by out-of-fold loss.

    .venv/bin/python bench/label_issues_rules.py [--noise 0.05 0.2]
"""

from __future__ import annotations

import argparse
import tempfile

import pandas as pd
from common import write_result
from label_issues import flagged_on_cv, noisy_table, precision_recall, top_loss_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", nargs="+", type=float, default=[0.05, 0.2])
    parser.add_argument("--cv-model", default="small_cnn_32")
    parser.add_argument("--cv-epochs", type=int, default=15)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for noise in args.noise:
            table, flipped = noisy_table(noise)
            cv, _, rules = flagged_on_cv(table, flipped, runs_dir, args.cv_model,
                                         args.cv_epochs)
            planted = set(flipped.tolist())
            names = list(table.task.names)
            oof = pd.read_csv(cv.cv_dir / "oof.csv")
            for rule in rules.values():
                rule["top_loss_same_count"] = precision_recall(
                    top_loss_rows(cv.cv_dir, names, rule["flagged"]), planted)
            results.append({"noise": noise, "flipped": len(flipped), "rows": len(oof),
                            "oof_accuracy": round(cv.summary["oof"]["accuracy"], 4),
                            "rules": rules})
            print(noise, {k: (v["precision"], v["recall"], v["flagged"])
                          for k, v in rules.items()}, flush=True)
    write_result("label_issues_rules", {
        "command": f"bench/label_issues_rules.py --noise {' '.join(map(str, args.noise))} "
                   f"--cv-model {args.cv_model} --cv-epochs {args.cv_epochs}",
        "cv": {"model": args.cv_model, "epochs": args.cv_epochs, "folds": 5},
        "results": results})


if __name__ == "__main__":
    main()
