"""`imagefit tune builtin:fashion-mnist --timeout 20m --budget 2m`: trials of two minutes
each for twenty minutes (the default space, the median pruner, one worker), then the best
trial's test accuracy against the default recipe's `imagefit fit builtin:fashion-mnist
--budget 2m` on seeds 0, 1 and 2 (median), measured after the search in the same run.

    .venv/bin/python bench/tune_fashion_mnist.py [--timeout 20m] [--budget 2m] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", default="20m")
    parser.add_argument("--budget", default="2m")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        started = time.perf_counter()
        command = [sys.executable, "-m", "imagefit", "tune", "builtin:fashion-mnist",
                   "--timeout", args.timeout, "--budget", args.budget, "--n-trials", "1000",
                   "--confirm", "0", "--no-progress", "--runs-dir", str(root)]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        tune_seconds = time.perf_counter() - started
        tune_dir = root / "fashion-mnist_tune"
        info = json.loads((tune_dir / "tune.json").read_text())
        best = info["best"]
        best_metrics = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())
        trials = [{k: r.get(k) for k in ("number", "state", "value", "epochs", "reports",
                                          "seconds")}
                  | {k: v for k, v in r.items() if k.startswith("param_")}
                  for r in info["rows"]]
        print(f"tune: {info['n_trials']} trials ({info['pruned']} pruned) in "
              f"{tune_seconds:.0f} s; best trial {best['number']}: valid "
              f"{best['value']:.4f}, test {best_metrics['test_accuracy']:.4f}", flush=True)
        defaults = []
        for seed in range(args.seeds):
            fit = subprocess.run([sys.executable, "-m", "imagefit", "fit",
                                  "builtin:fashion-mnist", "--budget", args.budget, "--seed",
                                  str(seed), "--no-progress", "--no-report", "--runs-dir",
                                  str(root / "defaults")], capture_output=True, text=True)
            assert fit.returncode == 0, fit.stderr[-3000:]
            run_dir = Path(fit.stdout.strip().splitlines()[-1])
            metrics = json.loads((run_dir / "metrics.json").read_text())
            defaults.append({"seed": seed, "test_accuracy": metrics["test_accuracy"],
                             "valid_accuracy": metrics.get("valid_accuracy"),
                             "epochs": metrics.get("epochs")})
            print(f"defaults seed {seed}: test {metrics['test_accuracy']:.4f}", flush=True)
    write_result("tune_fashion_mnist", {
        "command": f"bench/tune_fashion_mnist.py --timeout {args.timeout} --budget "
                   f"{args.budget} --seeds {args.seeds}",
        "optuna": version("optuna"), "timeout": args.timeout, "budget": args.budget,
        "tune_seconds": round(tune_seconds, 1), "n_trials": info["n_trials"],
        "complete": info["complete"], "pruned": info["pruned"], "failed": info["failed"],
        "best": {**best, "test_accuracy": best_metrics["test_accuracy"],
                 "epochs": best_metrics.get("epochs")},
        "trials": trials, "defaults": defaults,
        "defaults_median_test_accuracy": statistics.median(d["test_accuracy"]
                                                           for d in defaults)})


if __name__ == "__main__":
    main()
