"""Does augmentation pay on Fashion-MNIST? The default model for 10 epochs with a preset and
with ``none``, 3 seeds each; the official test set's accuracy, median and spread.

    .venv/bin/python bench/augment_accuracy.py [--presets none light] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from common import write_result

import imagefit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["none", "light"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--name", default="augment_accuracy",
                        help="result file name in bench/results (keep earlier runs apart)")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for preset in args.presets:
            accuracies = []
            for seed in args.seeds:
                result = imagefit.fit("builtin:fashion-mnist", epochs=args.epochs, seed=seed,
                                      augment=preset, runs_dir=runs_dir, progress=False)
                accuracies.append(round(result.metrics["test_accuracy"], 4))
                print(preset, seed, accuracies[-1], flush=True)
            runs[preset] = {
                "test_accuracy": accuracies,
                "median": statistics.median(accuracies),
                "spread": round(max(accuracies) - min(accuracies), 4),
            }
    write_result(args.name, {
        "command": f"imagefit fit builtin:fashion-mnist --epochs {args.epochs} --augment "
                   f"PRESET --seed SEED for PRESET in {args.presets}, SEED in {args.seeds}",
        "runs": runs,
    })


if __name__ == "__main__":
    main()
