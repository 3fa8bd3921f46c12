"""Time to accuracy on Fashion-MNIST's official test set: imagefit with --budget (several
budgets, 3 seeds each, all 60,000 training images) against fastai's usual recipe (its own
virtual environment, xresnet18, fit_one_cycle(5, 3e-3), one seed, test accuracy after every
epoch), in one run on this machine.

    .venv/bin/python bench/time_to_accuracy.py [--budgets 1m,2m,5m,10m] [--seeds 0,1,2]

imagefit's "time to X" is the smallest budget whose median test accuracy reaches X, given as
the median wall time of that budget's runs (process start to exit, measured from outside);
fastai's is the wall time (from its process's start) at the end of the first epoch whose
test accuracy reaches X. Image caches are built before any timing: imagefit reads the
arrays of builtin:fashion-mnist, fastai the PNG folders written by ``fastai_env``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_result
from fastai_env import ensure_fastai_venv, export_png_folders

BENCH = Path(__file__).resolve().parent
IMAGEFIT = Path(sys.executable).with_name("imagefit")
TARGETS = (0.90, 0.92, 0.93, 0.94)


def run_imagefit(budget: str, seed: int, runs_dir: Path) -> dict:
    """One ``imagefit fit builtin:fashion-mnist --budget B`` on all 60k training images."""
    command = [str(IMAGEFIT), "fit", "builtin:fashion-mnist", "--budget", budget,
               "--seed", str(seed), "--valid-pct", "0", "--runs-dir", str(runs_dir),
               "--name", f"b{budget}_s{seed}", "--no-progress"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"imagefit failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    run_dir = Path(done.stdout.strip().splitlines()[-1])  # fit's last line names it
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = metrics["budget"]
    row = {"budget": budget, "budget_seconds": record["budget_seconds"], "seed": seed,
           "wall_seconds": round(wall, 2), "used_seconds": record["used_seconds"],
           "within_budget": wall <= record["budget_seconds"],
           "model": (metrics.get("net_by_budget") or {}).get("chosen"),
           "test_accuracy": round(metrics["test_accuracy"], 4),
           "test_tta_accuracy": round(metrics.get("test_tta_accuracy", float("nan")), 4),
           "epochs": metrics["epochs"], "steps": record["plan"]["steps"],
           "steps_per_epoch": record["plan"]["steps_per_epoch"],
           "train_seconds": metrics["train_seconds"],
           "images_per_second": metrics["images_per_second"],
           "final_seconds": metrics["final_seconds"],
           "stopped_at_deadline": record["stopped_at_deadline"]}
    print(json.dumps(row), flush=True)
    return row


def headline(row: dict) -> float:
    """The accuracy a run reports as its result: with test-time augmentation when it ran."""
    tta = row["test_tta_accuracy"]
    return tta if tta == tta else row["test_accuracy"]  # NaN: no TTA


def imagefit_times(rows: list[dict], budgets: list[str]) -> tuple[list[dict], dict]:
    """Per budget: the medians over seeds; and the time to each target."""
    summary = []
    for budget in budgets:
        runs = [r for r in rows if r["budget"] == budget]
        summary.append({
            "budget": budget, "budget_seconds": runs[0]["budget_seconds"],
            "median_accuracy": round(statistics.median(headline(r) for r in runs), 4),
            "median_test_accuracy_without_tta": round(
                statistics.median(r["test_accuracy"] for r in runs), 4),
            "accuracies": [headline(r) for r in runs],
            "median_wall_seconds": round(statistics.median(r["wall_seconds"] for r in runs), 1),
            "max_wall_seconds": max(r["wall_seconds"] for r in runs),
            "all_within_budget": all(r["within_budget"] for r in runs),
            "median_epochs": statistics.median(r["steps"] / r["steps_per_epoch"] for r in runs),
        })
    times = {}
    for target in TARGETS:
        reached = [s for s in summary if s["median_accuracy"] >= target]
        times[f"{target:.2f}"] = reached[0]["median_wall_seconds"] if reached else None
    return summary, times


def run_fastai(epochs: int) -> dict:
    python = ensure_fastai_venv()
    root = export_png_folders(RESULTS / "tmp" / "fashion-mnist-png")
    out = RESULTS / "tmp" / "fastai_run.json"
    started = time.perf_counter()
    subprocess.run([str(python), str(BENCH / "fastai_baseline.py"), str(root), str(out),
                    "--epochs", str(epochs)], check=True)
    result = json.loads(out.read_text())
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    times = {}
    for target in TARGETS:
        reached = [e for e in result["epochs"] if e["test_accuracy"] >= target]
        times[f"{target:.2f}"] = round(reached[0]["seconds"], 1) if reached else None
    result["times"] = times
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="1m,2m,5m,10m")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fastai-epochs", type=int, default=5)
    args = parser.parse_args()
    budgets = args.budgets.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    fastai = run_fastai(args.fastai_epochs)
    print(json.dumps({"fastai": fastai["epochs"]}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for budget in budgets:
            for seed in seeds:
                rows.append(run_imagefit(budget, seed, Path(runs_dir)))
    summary, times = imagefit_times(rows, budgets)
    ratios = {target: round(fastai["times"][target] / seconds, 2)
              if seconds and fastai["times"][target] else None
              for target, seconds in times.items()}
    write_result("time_to_accuracy", {
        "command": f"bench/time_to_accuracy.py --budgets {args.budgets} --seeds {args.seeds}",
        "imagefit_command": "imagefit fit builtin:fashion-mnist --budget B --seed S "
                            "--valid-pct 0",
        "imagefit_runs": rows, "imagefit_budgets": summary, "imagefit_times": times,
        "fastai": fastai, "fastai_over_imagefit": ratios,
    })


if __name__ == "__main__":
    main()
