"""The sweep of issue 16's acceptance: `imagefit sweep builtin:fashion-mnist --models
small_cnn_16,small_cnn_32,resnet18 --budget 5m`, its table and figure kept in
bench/results (sweep_fashion_mnist.json, sweep_fashion_mnist.png), with the wall time from
outside the process.

    .venv/bin/python bench/sweep_fashion_mnist.py [--models ...] [--budget 5m]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_result

from imagefit.train.budget import parse_duration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn_16,small_cnn_32,resnet18")
    parser.add_argument("--budget", default="5m")
    args = parser.parse_args()
    command = ["sweep", "builtin:fashion-mnist", "--models", args.models, "--budget",
               args.budget, "--no-progress"]
    with tempfile.TemporaryDirectory() as runs_dir:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "imagefit", *command, "--runs-dir",
                               runs_dir], capture_output=True, text=True)
        wall = time.perf_counter() - started
        print(done.stdout[-3000:], done.stderr[-2000:])
        sweep_dir = Path(done.stdout.strip().splitlines()[-1])
        info = json.loads((sweep_dir / "sweep.json").read_text())
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(sweep_dir / "sweep.png", RESULTS / "sweep_fashion_mnist.png")
    write_result("sweep_fashion_mnist", {
        "command": f"bench/sweep_fashion_mnist.py --models {args.models} --budget "
                   f"{args.budget}",
        "imagefit_command": "imagefit " + " ".join(c for c in command if c != "--no-progress"),
        "exit_code": done.returncode, "wall_seconds": round(wall, 1),
        "budget_seconds": parse_duration(args.budget), "rows": info["rows"],
        "figure": "sweep_fashion_mnist.png",
    })


if __name__ == "__main__":
    main()
