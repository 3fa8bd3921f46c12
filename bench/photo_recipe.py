"""The photo fine-tuning recipe's ablation: each choice the default makes when a photo fit
has pretrained weights and the user sets nothing, changed one at a time, against the default
measured in the same run (`imagefit fit FOLDER --budget B --seed S` plus the change's flags;
medians of the seeds, wall seconds from outside the process).

The choices (docs/RECIPES.md, "Photos"): the learning rate (3e-3; `--lr auto` runs the LR
finder first), the image size (the images' own; larger costs time the budget takes from the
epochs; progressive resizing starts smaller), augmentation (none) and TTA (dropped when it
would take over a tenth of a budget), BatchNorm while frozen (its weights train), the frozen
epoch itself (one) and label smoothing (none).

Data as bench/photo_default.py writes it: fashion-mnist-64 (2,000 Fashion-MNIST images
upscaled to 64 px RGB: a poor domain for ImageNet weights, grey and centred, so it shows how
a choice spends a short budget more than what it does on real photos) and photo-crops-48 (60
crops of six scikit-image photos: real photo statistics, but easy and small, so it saturates
and separates little).

    .venv/bin/python bench/photo_recipe.py [--budget 1m] [--seeds 0,1,2]
        [--sets fashion-mnist-64] [--only NAME,...] [--tag T]

The result file is written again after each change, so an interrupted run keeps what it
finished ("complete" is false until the last).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import write_result
from photo_default import fit, write_fashion_mnist, write_photo_crops

# the change's name -> its flags (the default is measured first, in the same run)
CHANGES = {
    "default": [],
    "--lr auto (the LR finder's valley)": ["--lr", "auto"],
    "--lr 1e-3": ["--lr", "1e-3"],
    "--image-size 96 (upscaled)": ["--image-size", "96"],
    "--image-sizes 32,64 (progressive)": ["--image-sizes", "32,64"],
    "--augment light": ["--augment", "light"],
    "--tta (kept whatever it costs)": ["--tta"],
    "--no-train-bn (BatchNorm frozen with the body)": ["--no-train-bn"],
    "--freeze-epochs 0 (no frozen epoch)": ["--freeze-epochs", "0"],
    "--label-smoothing 0.1": ["--label-smoothing", "0.1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/imagefit-photo-bench"))
    parser.add_argument("--budget", default="1m")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sets", default="fashion-mnist-64")
    parser.add_argument("--only", default="", help="comma-separated change names (the "
                        "default is always run)")
    parser.add_argument("--tag", default="", help="appended to the result file's name")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = wanted - set(CHANGES)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; known: {list(CHANGES)}")
    changes = {name: flags for name, flags in CHANGES.items()
               if name == "default" or not wanted or name in wanted}
    writers = {"fashion-mnist-64": lambda: write_fashion_mnist(
                   args.root / "fashion-mnist-64", 2000, 2000),
               "photo-crops-48": lambda: write_photo_crops(args.root / "photo-crops-48", 60, 600)}
    rows, summary = [], []
    command = (f"bench/photo_recipe.py --budget {args.budget} --seeds {args.seeds} "
               f"--sets {args.sets}" + (f" --only '{args.only}'" if args.only else ""))

    def write(complete: bool) -> None:
        write_result("photo_recipe" + (f"_{args.tag}" if args.tag else ""), {
            "command": command, "complete": complete, "budget": args.budget,
            "summary": summary, "runs": rows})

    with tempfile.TemporaryDirectory() as runs_dir:
        for name in args.sets.split(","):
            data = writers[name]()
            base: list[float] = []
            for change, flags in changes.items():
                runs = [fit(data, args.budget, seed, flags, Path(runs_dir)) for seed in seeds]
                rows += [{"set": name, "change": change, "flags": flags, **run} for run in runs]
                accuracies = [r["headline_accuracy"] for r in runs]
                base = base or accuracies  # the default runs first
                summary.append({
                    "set": name, "change": change, "flags": " ".join(flags),
                    "median_accuracy": statistics.median(accuracies), "accuracies": accuracies,
                    "vs_default": round(statistics.median(accuracies)
                                        - statistics.median(base), 4),
                    # seed by seed against the default's same seed: a change that helps on
                    # every seed is told apart from one within the seeds' spread
                    "better_seeds": sum(a > b for a, b in zip(accuracies, base)),
                    "median_epochs": statistics.median(r["epochs"] for r in runs),
                    "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs)})
                print(json.dumps(summary[-1]), flush=True)
                write(complete=False)
    write(complete=True)


if __name__ == "__main__":
    main()
