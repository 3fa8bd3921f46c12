"""Fashion-MNIST through the folder path: writes the 70k images as PNGs in
``train/<class>/`` and ``test/<class>/`` folders, then runs the default fit on the folder
and on builtin:fashion-mnist with the same seed, and compares their test accuracy.

    .venv/bin/python bench/fashion_mnist_folder.py [--root /tmp/fashion-mnist-png] [--epochs 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import write_result
from PIL import Image

import imagefit
from imagefit.data.builtin import read_builtin


def write_pngs(root: Path) -> float:
    """The dataset as PNG files; class names made safe for folder names."""
    table = read_builtin("fashion-mnist")
    started = time.perf_counter()
    names = [n.replace("/", "_") for n in table.task.names]
    for split in ("train", "test"):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)

    def save(row: int) -> None:
        path = root / table.split[row] / names[table.targets[row]] / f"{row:05d}.png"
        if not path.exists():
            Image.fromarray(table.arrays[row, ..., 0]).save(path)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save, range(len(table))))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/tmp/fashion-mnist-png"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_seconds = write_pngs(args.root)
    results = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for label, data in (("folder", args.root), ("builtin", "builtin:fashion-mnist")):
            started = time.perf_counter()
            fit = imagefit.fit(data, epochs=args.epochs, seed=args.seed, runs_dir=runs_dir)
            results[label] = {
                "data": str(data),
                "test_accuracy": round(fit.metrics["test_accuracy"], 4),
                "cache_seconds": fit.metrics["cache_seconds"],
                "seconds": round(time.perf_counter() - started, 1),
                "train_images_per_second": fit.metrics["images_per_second"],
            }
    gap = abs(results["folder"]["test_accuracy"] - results["builtin"]["test_accuracy"])
    write_result("fashion_mnist_folder", {
        "command": f"imagefit fit {args.root} --epochs {args.epochs} vs builtin:fashion-mnist",
        "png_write_seconds": round(write_seconds, 1),
        "runs": results,
        "test_accuracy_gap_points": round(100 * gap, 2),
    })


if __name__ == "__main__":
    main()
