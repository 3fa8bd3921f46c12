"""bf16 against fp32 on the fit that diverged now and then under bf16 autocast on a CPU with
AMX: ResNet-18 on 16 px digits, two precomputed epochs then one of the whole model at lr 3e-3
(the fit of tests/test_train.py's precompute test). Each seed runs in both precisions; a run
counts as NaN when it stops diverged. With imagefit's guard, a bf16 step whose loss or
gradient is not finite is computed again in fp32 (learner.py, ``_redo_in_fp32``): the runs
that needed it are counted apart, with their steps.

    .venv/bin/python bench/bf16_stress.py [--seeds 10] [--lr 3e-3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch
from common import write_result

import imagefit
from imagefit.devices import cpu_has_amx
from imagefit.errors import TrainingDiverged


def one_fit(precision: str, seed: int, lr: float, runs_dir: str) -> dict:
    started = time.perf_counter()
    row = {"precision": precision, "seed": seed}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = imagefit.fit("builtin:digits", model="resnet18", image_size=16, bs=64,
                                  precompute_epochs=2, freeze_epochs=0, epochs=1, lr=lr,
                                  precision=precision, seed=seed, runs_dir=runs_dir,
                                  progress=False, report=False)
        metrics = json.loads((result.run_dir / "metrics.json").read_text())
        row.update(diverged=False, valid_accuracy=round(metrics["valid_accuracy"], 4),
                   steps_redone_in_fp32=metrics.get("bf16_steps_redone_in_fp32", 0))
    except TrainingDiverged as error:
        row.update(diverged=True, error=str(error).splitlines()[0])
    row["seconds"] = round(time.perf_counter() - started, 1)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in range(args.seeds):
            for precision in ("bf16", "fp32"):
                rows.append(one_fit(precision, seed, args.lr, runs_dir))
    counts = {precision: {
        "runs": sum(r["precision"] == precision for r in rows),
        "diverged": sum(r["precision"] == precision and r["diverged"] for r in rows),
        "runs_with_steps_redone": sum(r["precision"] == precision
                                      and r.get("steps_redone_in_fp32", 0) > 0 for r in rows),
        "steps_redone": sum(r.get("steps_redone_in_fp32", 0) for r in rows
                            if r["precision"] == precision)}
        for precision in ("bf16", "fp32")}
    write_result("bf16_stress", {
        "command": f"bench/bf16_stress.py --seeds {args.seeds} --lr {args.lr:g}",
        "cpu_has_amx": cpu_has_amx(), "onednn": torch.backends.mkldnn.is_available()
        and torch.__config__.show().split("MKL-DNN ")[-1].split(" ")[0],
        "counts": counts, "runs": rows})


if __name__ == "__main__":
    main()
