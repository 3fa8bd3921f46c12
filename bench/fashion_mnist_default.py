"""The default fit on builtin:fashion-mnist: seconds per epoch, training images/s and the
official test set's accuracy after every epoch (evaluated for the curve only).

    .venv/bin/python bench/fashion_mnist_default.py [--epochs 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile

from common import write_result

import imagefit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs_dir:
        result = imagefit.fit("builtin:fashion-mnist", epochs=args.epochs, seed=args.seed,
                              runs_dir=runs_dir, test_every_epoch=True)
    per_epoch = [
        {"epoch": row["epoch"], "seconds": round(row["time"], 2),
         "valid_accuracy": round(row["valid_accuracy"], 4),
         "test_accuracy": round(row["test_accuracy"], 4)}
        for row in result.history
    ]
    write_result("fashion_mnist_default", {
        "command": f"imagefit fit builtin:fashion-mnist --epochs {args.epochs} "
                   f"--seed {args.seed} (test evaluated every epoch for the curve)",
        "epochs": per_epoch,
        "final_test_accuracy": round(result.metrics["test_accuracy"], 4),
        "train_images_per_second": result.metrics["images_per_second"],
        "median_epoch_seconds": sorted(r["seconds"] for r in per_epoch)[len(per_epoch) // 2],
        "n_train": result.metrics["n_train"],
    })


if __name__ == "__main__":
    main()
