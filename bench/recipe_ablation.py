"""The small-image recipe's ablation: each row changes one choice of the default recipe and
trains with the same --budget on Fashion-MNIST's training images, scored on a validation
split carved from them (10,000 of the 60,000; the official test set is not looked at).

    .venv/bin/python bench/recipe_ablation.py [--budget 1m] [--rows all] [--seeds 0] [--name N]

Every row is the real command, ``imagefit fit builtin:fashion-mnist --budget B
--valid-pct 0.1667 --seed S`` plus its change, so the time each choice costs (a slower step,
a compile, a longer evaluation) is paid inside the budget, as a user would pay it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result

IMAGEFIT = Path(sys.executable).with_name("imagefit")
VALID_PCT = "0.1667"  # 10,000 of the 60,000 training images

# (what changes, the options that change it); the first row is the recipe itself
ROWS = [
    ("recipe: small_cnn_16 (small_cnn_32 when the budget holds 15 epochs of it), SGD Nesterov "
     "lr 0.1 wd 5e-4, bs 128, label smoothing 0.1, flip + 2 px shift, flip TTA, channels_last",
     []),
    ("width: small_cnn_32 (32-64-128)", ["--model", "small_cnn_32"]),
    ("width: small_cnn_64 (64-128-256)", ["--model", "small_cnn_64"]),
    ("depth: small_cnn (a stem conv and 32-64-128 stages, imagefit 0.1's net)",
     ["--model", "small_cnn"]),
    ("optimizer: AdamW lr 3e-3 wd 0.05", ["--opt", "adamw", "--lr", "3e-3", "--wd", "0.05"]),
    ("learning rate 0.05", ["--lr", "0.05"]),
    ("learning rate 0.2", ["--lr", "0.2"]),
    ("batch size 64", ["--bs", "64"]),
    ("batch size 256", ["--bs", "256"]),
    ("label smoothing 0", ["--label-smoothing", "0"]),
    ("augmentation: none", ["--augment", "none"]),
    ("TTA: 4 random light versions instead of the mirror image", ["--tta-augment", "light"]),
    ("EMA of the weights (decay 0.999)", ["--ema", "0.999"]),
    ("channels_last off", ["--no-channels-last"]),
    ("torch.compile", ["--compile"]),
    ("random erasing: one box per image with probability 0.25 (2-25 % of the area)",
     ["--augment-options", '{"erase_p": 0.25}']),
    ("width: small_cnn_16 named (the recipe's net below the budget that chooses small_cnn_32)",
     ["--model", "small_cnn_16"]),
]
NOISE_SEEDS = (1, 2)  # the recipe again, to show the spread between seeds


def run(budget: str, seed: int, extra: list[str], runs_dir: Path) -> dict:
    command = [str(IMAGEFIT), "fit", "builtin:fashion-mnist", "--budget", budget,
               "--valid-pct", VALID_PCT, "--seed", str(seed), "--runs-dir", str(runs_dir),
               "--no-progress", *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    plan = metrics["budget"]["plan"]
    return {
        "valid_accuracy": round(metrics["valid_accuracy"], 4),
        "valid_tta_accuracy": round(metrics.get("valid_tta_accuracy", float("nan")), 4),
        "epochs": round(plan["steps"] / plan["steps_per_epoch"], 2),
        "images_per_second": metrics["images_per_second"],
        "used_seconds": metrics["budget"]["used_seconds"],
        "final_seconds": metrics["final_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="1m")
    parser.add_argument("--rows", default="all", help="comma-separated row numbers, or all")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds, each row run at every one (default 0)")
    parser.add_argument("--name", help="of the result file (default: by the budget)")
    args = parser.parse_args()
    chosen = range(len(ROWS)) if args.rows == "all" else [int(r) for r in args.rows.split(",")]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in seeds:  # seed-major, so a stopped run still holds every row at some seed
            for index in chosen:
                change, extra = ROWS[index]
                result = {"change": change, "options": " ".join(extra), "seed": seed,
                          **run(args.budget, seed, extra, Path(runs_dir))}
                print(json.dumps(result), flush=True)
                rows.append(result)
        noise = [row for row in rows if row["options"] == ""]
        if args.rows == "all" and seeds == [0]:
            for seed in NOISE_SEEDS:
                noise.append({"seed": seed, **run(args.budget, seed, [], Path(runs_dir))})
                print(json.dumps(noise[-1]), flush=True)
    spread = [r["valid_tta_accuracy"] for r in noise if "valid_tta_accuracy" in r]
    name = args.name or ("recipe_ablation" if args.rows == "all" else
                         f"recipe_ablation_{args.budget}")
    write_result(name, {
        "command": f"bench/recipe_ablation.py --budget {args.budget} --rows {args.rows}"
                   + (f" --seeds {args.seeds}" if args.seeds != "0" else "")
                   + (f" --name {args.name}" if args.name else ""),
        "seeds": seeds,
        "budget": args.budget, "valid_pct": float(VALID_PCT), "rows": rows,
        "recipe_seeds": noise,
        "recipe_median": statistics.median(spread) if spread else None,
        "recipe_range": [min(spread), max(spread)] if spread else None,
    })


if __name__ == "__main__":
    main()
