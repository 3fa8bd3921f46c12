"""Photos by default: the new default of a photo fit (tf_efficientnet_lite0 from ImageNet
weights, fine-tuned: one frozen epoch, then every layer at discriminative rates) against the
old one (resnet18 from scratch, now `--pretrained none`), each as a user runs it: `imagefit
fit FOLDER --budget B` and nothing else, wall time measured from outside the process.

Also the candidates' training speed at the photo sizes, for the choice of the default net:
images a second of a training step (batch 32, channels-last, AdamW) at 64 and 128 px.

Data (written once under --root, as PNG folders `train/<class>/`, `test/<class>/`):
- fashion-mnist-64: --train Fashion-MNIST training images (seeded draw) and the first
  --test of its official test set, upscaled to 64 px and made RGB. A poor domain for
  ImageNet weights (grey, centred, tiny objects): the gain it shows is a floor.
- photo-crops-48: crops of six of scikit-image's photos (bench/photos.py) at 48 px, few
  training images. Easy (one photo per class): it shows whether a budget is spent well, and
  saturates near 1.0 at longer budgets.

    .venv/bin/python bench/photo_default.py [--budgets 1m,2m] [--seeds 0,1,2] [--sets ...]
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

import numpy as np
from common import write_result
from photos import write_photo_folder
from PIL import Image

BENCH = Path(__file__).resolve().parent
IMAGEFIT = Path(sys.executable).with_name("imagefit")
SIDES = {"default (pretrained)": [], "old default (--pretrained none)": ["--pretrained", "none"]}
SPEED_NETS = ("resnet18", "tf_efficientnet_lite0", "resnet10t", "mobilenetv3_large_100")


def write_fashion_mnist(root: Path, train: int, test: int, seed: int = 0) -> Path:
    from imagefit.data.builtin import read_builtin

    if (root / "done").exists():
        return root
    table = read_builtin("fashion-mnist")
    rng = np.random.default_rng(seed)
    rows = {"train": np.sort(rng.choice(60000, train, replace=False)),
            "test": 60000 + np.arange(test)}
    names = [name.replace("/", "-") for name in table.task.names]
    for split, chosen in rows.items():
        for row in chosen:
            label = names[int(table.targets[row])]
            path = root / split / label / f"{row:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(table.arrays[row].squeeze()).resize((64, 64), Image.BICUBIC)
            image.convert("RGB").save(path)
    (root / "done").touch()
    return root


def write_photo_crops(root: Path, train: int, test: int) -> Path:
    if (root / "done").exists():
        return root
    write_photo_folder(root / "train", train, 48, seed=0)
    write_photo_folder(root / "test", test, 48, seed=1)
    (root / "done").touch()
    return root


def fit(data: Path, budget: str, seed: int, extra: list[str], runs_dir: Path) -> dict:
    command = [str(IMAGEFIT), "fit", str(data), "--budget", budget, "--seed", str(seed),
               "--runs-dir", str(runs_dir), "--no-progress", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "model.json").read_text())
    tta = metrics.get("test_tta_accuracy")
    row = {"budget": budget, "seed": seed, "wall_seconds": round(wall, 1),
           "model": info["architecture"], "weights": info.get("pretrained"),
           "image_size": info["image_size"], "epochs": metrics["epochs"],
           "budget_used_seconds": metrics["budget"]["used_seconds"],
           "train_seconds": metrics["train_seconds"], "final_seconds": metrics["final_seconds"],
           "test_accuracy": round(metrics["test_accuracy"], 4),
           "headline_accuracy": round(tta if tta is not None else metrics["test_accuracy"], 4),
           "weights_line": next((line for line in done.stdout.splitlines()
                                 if line.startswith("weights:")), None)}
    print(json.dumps(row), flush=True)
    return row


def training_speed(name: str, size: int, repeats: int = 3) -> float:
    """Median over ``repeats`` of the images a second of 5 timed training steps (after 2)."""
    import timm
    import torch

    model = timm.create_model(name, num_classes=10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(32, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (32,))
    rates = []
    for _ in range(repeats):
        for step in range(7):
            if step == 2:
                started = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(5 * 32 / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/tmp/imagefit-photo-bench"))
    parser.add_argument("--budgets", default="1m,2m")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sets", default="fashion-mnist-64,photo-crops-48")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--tag", default="", help="appended to the result file's name")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    writers = {"fashion-mnist-64": lambda: write_fashion_mnist(
                   args.root / "fashion-mnist-64", args.train, args.test),
               "photo-crops-48": lambda: write_photo_crops(args.root / "photo-crops-48", 60, 600)}
    speed = {}
    if not args.no_speed:
        import torch
        torch.manual_seed(0)
        speed = {f"{name} @{size}px": training_speed(name, size)
                 for name in SPEED_NETS for size in (64, 128)}
        print(json.dumps(speed), flush=True)
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as runs_dir:
        for name in args.sets.split(","):
            data = writers[name]()
            for budget in args.budgets.split(","):
                for side, extra in SIDES.items():
                    runs = [fit(data, budget, seed, extra, Path(runs_dir)) for seed in seeds]
                    rows += [{"set": name, "side": side, **run} for run in runs]
                    summary.append({
                        "set": name, "budget": budget, "side": side, "model": runs[0]["model"],
                        "median_accuracy": statistics.median(r["headline_accuracy"]
                                                             for r in runs),
                        "accuracies": [r["headline_accuracy"] for r in runs],
                        "median_wall_seconds": statistics.median(r["wall_seconds"]
                                                                 for r in runs)})
                    print(json.dumps(summary[-1]), flush=True)
    write_result("photo_default" + (f"_{args.tag}" if args.tag else ""), {
        "command": f"bench/photo_default.py --budgets {args.budgets} --seeds {args.seeds} "
                   f"--sets {args.sets} --train {args.train} --test {args.test}",
        "training_images_per_second": speed, "summary": summary, "runs": rows})


if __name__ == "__main__":
    main()
