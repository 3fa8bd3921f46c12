"""fp32 against bf16 autocast for the default Fashion-MNIST fit on this CPU: training images/s
and test accuracy, the two precisions alternating run by run (``--pairs`` of each), so that
both see the same machine load. What ``--precision auto`` chooses here is recorded with them.

    .venv/bin/python bench/precision.py [--epochs 5] [--pairs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from common import write_result

import imagefit
from imagefit.devices import cpu_has_amx, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    runs = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as runs_dir:
        for pair in range(args.pairs):
            for precision in runs:
                result = imagefit.fit("builtin:fashion-mnist", epochs=args.epochs, seed=pair,
                                      precision=precision, runs_dir=runs_dir, progress=False,
                                      report=False)
                runs[precision].append({
                    "seed": pair,
                    "train_images_per_second": result.metrics["images_per_second"],
                    "test_accuracy": round(result.metrics["test_accuracy"], 4)})
                print(precision, runs[precision][-1], flush=True)
    summary = {}
    for precision, rows in runs.items():
        summary[precision] = {
            "runs": rows,
            "median_images_per_second": statistics.median(
                r["train_images_per_second"] for r in rows),
            "median_test_accuracy": statistics.median(r["test_accuracy"] for r in rows)}
    write_result("precision", {
        "command": f"bench/precision.py --epochs {args.epochs} --pairs {args.pairs}",
        "cpu_has_amx": cpu_has_amx(),
        "auto_means": resolve_precision("auto", torch.device("cpu")),
        "epochs": args.epochs,
        "precisions": summary,
        "bf16_speedup": round(summary["bf16"]["median_images_per_second"]
                              / summary["fp32"]["median_images_per_second"], 2),
    })


if __name__ == "__main__":
    main()
