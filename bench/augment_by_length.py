"""The small-image recipe's augmentation against none, by the fit's length, under --budget on
Fashion-MNIST's carved validation split (the split the recipe is chosen on): `imagefit fit
builtin:fashion-mnist --budget B --seed S --no-report` with `--augment light --tta` (the
recipe's flip TTA) and with `--augment none --no-tta`, 3 seeds each; the epochs each fit
planned are read from its metrics.json. This chose AUGMENT_FROM_EPOCHS (workflows/build.py).
A second table may show the official test split (`--valid-pct 0`), never used to choose.

    .venv/bin/python bench/augment_by_length.py [--budget 1m] [--seeds 0,1,2] [--test]
    .venv/bin/python bench/augment_by_length.py --collect RUNS_DIR   # runs made by this script
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result

VARIANTS = {"aug": ["--augment", "light", "--tta"], "noaug": ["--augment", "none", "--no-tta"]}


def run(runs_dir: Path, budget: str, seed: int, variant: str, test: bool) -> None:
    command = [sys.executable, "-m", "imagefit", "fit", "builtin:fashion-mnist", "--budget",
               budget, "--seed", str(seed), "--runs-dir", str(runs_dir), "--name",
               f"{variant}_s{seed}", "--no-progress", "--no-report", *VARIANTS[variant]]
    if test:
        command += ["--valid-pct", "0"]
    subprocess.run(command, check=True, capture_output=True)


def collect(runs_dir: Path, test: bool) -> list[dict]:
    split = "test" if test else "valid"
    rows = []
    for metrics_path in sorted(runs_dir.glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        variant, seed = metrics_path.parent.name.split("_", 2)[2].rsplit("_s", 1)
        plan = metrics["budget"]["plan"]
        rows.append({"variant": variant, "seed": int(seed),
                     "accuracy": metrics.get(f"{split}_tta_accuracy",
                                             metrics[f"{split}_accuracy"]),
                     "plain_accuracy": metrics[f"{split}_accuracy"],
                     "epochs": round(plan["steps"] / plan["steps_per_epoch"], 2),
                     "n_train": metrics["n_train"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="1m")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--test", action="store_true", help="the official test split")
    parser.add_argument("--collect", type=Path, help="read the runs of an earlier invocation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.collect or Path(tmp)
        if args.collect is None:
            for seed in map(int, args.seeds.split(",")):
                for variant in VARIANTS:
                    run(runs_dir, args.budget, seed, variant, args.test)
        rows = collect(runs_dir, args.test)
    summary = {variant: {"median": statistics.median(r["accuracy"] for r in rows
                                                     if r["variant"] == variant),
                         "epochs": [r["epochs"] for r in rows if r["variant"] == variant]}
               for variant in VARIANTS}
    print(json.dumps(summary, indent=1))
    write_result("augment_by_length" + ("_test" if args.test else ""), {
        "command": f"python bench/augment_by_length.py --budget {args.budget} --seeds "
                   f"{args.seeds}" + (" --test" if args.test else ""),
        "budget": args.budget, "split": "test" if args.test else "valid", "rows": rows,
        "summary": summary})


if __name__ == "__main__":
    main()
