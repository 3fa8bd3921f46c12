"""The regression check of the time-to-accuracy figure (``--budget 2m`` reaches a median test
accuracy of at least 0.92 on Fashion-MNIST, every run exiting within its budget), the
imagefit side of ``bench/time_to_accuracy.py`` alone, without fastai's 12 minutes.

    .venv/bin/python bench/budget_regression.py [--budgets 2m] [--seeds 0,1,2] [--name N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import write_result
from time_to_accuracy import imagefit_times, run_imagefit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="2m")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--name", default="budget_regression", help="of the result file")
    args = parser.parse_args()
    budgets = args.budgets.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for budget in budgets:
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(run_imagefit(budget, seed, Path(runs_dir)))
    summary, _ = imagefit_times(rows, budgets)
    write_result(args.name, {
        "command": f"bench/budget_regression.py --budgets {args.budgets} --seeds {args.seeds}",
        "imagefit_command": "imagefit fit builtin:fashion-mnist --budget B --seed S "
                            "--valid-pct 0",
        "runs": rows, "budgets": summary,
    })


if __name__ == "__main__":
    main()
