"""imagefit's training speed against the compute floor: how close end-to-end training (cache,
loader, augmentation, the learner's step and its bookkeeping) comes to the model's own
forward + backward + optimizer step on a batch that is already on the device.

Rows: imagefit's default small CNN on Fashion-MNIST (28 px, grey) and ResNet-18 at 64 and
128 px (RGB) on a folder of 256-px JPEGs cut from scikit-image's bundled photos (6 classes,
one per photo; see photos.py), each source decoded once into imagefit's cache (in a temporary
folder) before anything is timed. Switches: the defaults (channels-last, eager), channels-last
off, torch.compile on (small CNN and ResNet-18 at 64 px only), and, on a GPU, the cache kept
in host memory and streamed (`streamed`) where the default holds a cache that fits on the
device (``data.loader.on_device_if_it_fits``).

For every row and switch, one process trains through imagefit's own ``Learner`` (built by
``loading.load_data``, ``build_training`` and ``make_learner`` with the default options: AdamW,
batch 128, the precision and memory format imagefit picks) for ``pairs + 1`` epochs without
validation. The first epoch warms up (and compiles) and is timed apart. Before every later
epoch the floor runs for ``--seconds``: the learner's own model (compiled or not) and
optimizer, the same batch size, memory format, precision and loss, again and again on one
batch already on the device: the first training batch, augmented and normalized. (Not random
values: on them the max-pooling of contiguous tensors ran 7x slower on this CPU, its branches
mispredicted, which would flatter the end-to-end side.) Each epoch reads a fixed number of
training rows (a seeded sample of the training split, repeated when it is too small), chosen
from a short calibration of the floor so that an epoch lasts about ``--seconds`` too.
Reported: the medians of the floor's and the epochs' images/s and the median of the per-pair
ratios (end to end / floor). Compile time is the first training step's time less a typical
step's.

``--profile auto`` captures torch.profiler tables (top operators by self CPU time) of one more
end-to-end epoch and of one more floor run wherever the median ratio is under 0.9, in
bench/results/<name>_profile_<row>[_<switch>].txt; ``always`` and ``never`` do what they say.

    .venv/bin/python -m pip install scikit-image   # the photos of the ResNet rows
    .venv/bin/python bench/compute_floor.py [--rows small_cnn-28,resnet18-64,resnet18-128]
        [--switches default,contiguous,compile] [--pairs 5] [--seconds 25] [--profile auto]
        [--name compute_floor]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, write_result
from photos import write_photo_folder

from imagefit.config import FitConfig
from imagefit.data import loader as loader_module
from imagefit.devices import resolve_device, resolve_precision
from imagefit.tasks import Task
from imagefit.train.callbacks.base import Callback
from imagefit.train.optim import make_optimizer
from imagefit.workflows.build import build_training, make_learner, make_schedule
from imagefit.workflows.loading import load_data

ROWS = {
    "small_cnn-28": {"data": "builtin:fashion-mnist", "model": "small_cnn", "image_size": None,
                     "channels": None, "compile": True},
    "resnet18-64": {"data": "photos", "model": "resnet18", "image_size": 64, "channels": 3,
                    "compile": True},
    "resnet18-128": {"data": "photos", "model": "resnet18", "image_size": 128, "channels": 3,
                     "compile": False},
    "resnet18-224": {"data": "photos", "model": "resnet18", "image_size": 224, "channels": 3,
                     "compile": False},  # for a GPU: too slow to time well on 2 CPU cores
}
SWITCHES = {"default": {}, "contiguous": {"channels_last": False}, "compile": {"compile": True},
            "streamed": {}}  # streamed: the cache kept off a GPU (the same as default on a CPU)
PROFILE_BELOW = 0.9
PROFILE_ROWS = 30


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, task: Task,
               precision: str, x: torch.Tensor, y: torch.Tensor, seconds: float
               ) -> tuple[float, float]:
    """Images/s and seconds of training steps on the one batch ``x, y`` for about
    ``seconds`` (after one untimed step)."""

    def step() -> None:
        with autocast(precision, x.device):
            loss = task.loss(model(x).float(), y, weighted=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    synchronize(x.device)
    started = time.perf_counter()
    steps = 0
    while True:
        step()
        steps += 1
        synchronize(x.device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return steps * len(x) / elapsed, elapsed


def first_batch(parts, memory_format: torch.memory_format
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loader's first batch through the training pipeline, on the device."""
    x, y = next(iter(parts.loaders["train"]))
    generator = torch.Generator(x.device).manual_seed(0)
    x, y = parts.pipeline.train_batch(x, y, generator)
    return x.contiguous(memory_format=memory_format), y


class PairedFloor(Callback):
    """Before every epoch but the first: the floor through the learner's own model and
    optimizer on the first training batch (kept on the device). After every epoch: that
    epoch's training images/s. Also times the first training step (compilation happens
    there)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.x: torch.Tensor | None = None
        self.floor: list[float] = []
        self.floor_seconds: list[float] = []
        self.end_to_end: list[float] = []
        self.epoch_seconds: list[float] = []
        self.warmup_seconds = 0.0
        self.first_step_seconds: float | None = None

    def before_epoch(self, learner) -> None:
        if learner.epoch > 0:
            rate, seconds = floor_rate(learner.forward_model, learner.optimizer, learner.task,
                                       learner.precision, self.x, self.y, self.seconds)
            self.floor.append(rate)
            self.floor_seconds.append(seconds)
        self.mark = (learner.train_images, learner.train_seconds)
        self.epoch_started = time.perf_counter()

    def after_batch(self, learner) -> None:
        if self.first_step_seconds is None:
            synchronize(learner.device)
            self.first_step_seconds = time.perf_counter() - self.epoch_started
            self.x, self.y = learner.x.detach().clone(), learner.y.clone()

    def after_epoch(self, learner) -> None:
        images = learner.train_images - self.mark[0]
        seconds = learner.train_seconds - self.mark[1]
        if learner.epoch == 0:
            self.warmup_seconds = seconds
            return
        self.end_to_end.append(images / seconds)
        self.epoch_seconds.append(seconds)
        print(f"  pair {len(self.end_to_end)}: floor {self.floor[-1]:.0f} img/s, end to end "
              f"{self.end_to_end[-1]:.0f} img/s", flush=True)


def make_config(row: dict, switch: dict, cache_dir: str, pairs: int, augment: str) -> FitConfig:
    return FitConfig(model=row["model"], image_size=row["image_size"], channels=row["channels"],
                     cache_dir=cache_dir, progress=False, epochs=pairs + 1, augment=augment,
                     **switch)


def calibrate(cfg: FitConfig, loaded, device: torch.device, seconds: float) -> float:
    """The floor's images/s with the default switches, from a short run on a fresh model."""
    parts = build_training(cfg, loaded, device)
    optimizer = make_optimizer(parts.model, cfg.opt, float(cfg.lr), cfg.wd)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x, y = first_batch(parts, memory_format)
    parts.model.train()
    rate, _ = floor_rate(parts.model, optimizer, parts.task,
                         resolve_precision(cfg.precision, device), x, y, seconds)
    return rate


def epoch_rows(train_rows: np.ndarray, count: int) -> np.ndarray:
    """``count`` training rows: a seeded shuffle of the split, repeated as often as needed."""
    return np.resize(np.random.default_rng(0).permutation(train_rows), count)


def top_operators(profile, count: int = 8) -> list[dict]:
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
             "share": round(e.self_cpu_time_total / total, 4)} for e in events[:count]]


def capture_profiles(learner, paired: PairedFloor, cfg: FitConfig, path: Path) -> dict:
    """torch.profiler tables of one more end-to-end epoch and one more floor run."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if learner.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    learner.callbacks = []  # the paired measurement is over
    _, lr_schedule, momentum = make_schedule(cfg.model_copy(update={"epochs": 1}))
    seconds_before, images_before = learner.train_seconds, learner.train_images
    with torch.profiler.profile(activities=activities) as epoch_profile:
        learner.fit(1, lr_schedule, momentum)
    epoch_seconds = learner.train_seconds - seconds_before
    epoch_rate = (learner.train_images - images_before) / epoch_seconds
    with torch.profiler.profile(activities=activities) as floor_profile:
        floor, floor_seconds = floor_rate(learner.forward_model, learner.optimizer,
                                          learner.task, learner.precision, paired.x, paired.y,
                                          paired.seconds)
    sort = "self_cuda_time_total" if learner.device.type == "cuda" else "self_cpu_time_total"
    path.write_text("\n".join([
        f"torch.profiler, top {PROFILE_ROWS} operators by {sort}; both runs under the profiler "
        "(slower than unprofiled). The loader's background thread is not traced unless listed.",
        "",
        f"End to end: one epoch of {epoch_seconds:.1f} s training, {epoch_rate:.0f} images/s",
        epoch_profile.key_averages().table(sort_by=sort, row_limit=PROFILE_ROWS),
        f"Floor: {floor_seconds:.1f} s on one training batch, {floor:.0f} images/s",
        floor_profile.key_averages().table(sort_by=sort, row_limit=PROFILE_ROWS),
    ]) + "\n")
    print(f"  wrote {path}", flush=True)
    return {"file": path.name,
            "end_to_end_images_per_second": round(epoch_rate, 1),
            "floor_images_per_second": round(floor, 1),
            "end_to_end_top": top_operators(epoch_profile),
            "floor_top": top_operators(floor_profile)}


def measure(name: str, row_name: str, switch_name: str, cfg: FitConfig, loaded,
            device: torch.device, n_rows: int, args) -> dict:
    """One row and switch: ``pairs`` alternated floor runs and epochs, then maybe profiles."""
    parts = build_training(cfg, loaded, device)
    train = parts.loaders["train"]
    train.rows = train.rows[:n_rows]  # batch size chosen for the whole split, epochs cut short
    paired = PairedFloor(args.seconds)
    learner = make_learner(cfg, parts, [paired])
    epochs, lr_schedule, momentum = make_schedule(cfg)
    learner.fit(epochs, lr_schedule, momentum)
    ratios = [e / f for e, f in zip(paired.end_to_end, paired.floor)]
    end_to_end = statistics.median(paired.end_to_end)
    step_seconds = parts.batch_size / end_to_end
    run = {
        "row": row_name, "switch": switch_name, "model": cfg.model,
        "image_size": cfg.image_size, "channels": cfg.channels,
        "channels_last": cfg.channels_last, "compile": cfg.compile,
        "precision": learner.precision, "batch_size": parts.batch_size,
        "cache_on_device": train.images.device.type == "cuda",
        "rows_per_epoch": len(train.rows), "steps_per_epoch": len(train),
        "floor_images_per_second": round(statistics.median(paired.floor), 1),
        "end_to_end_images_per_second": round(end_to_end, 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "floor": [round(r, 1) for r in paired.floor],
        "end_to_end": [round(r, 1) for r in paired.end_to_end],
        "floor_seconds": [round(s, 1) for s in paired.floor_seconds],
        "epoch_seconds": [round(s, 1) for s in paired.epoch_seconds],
        "warmup_epoch_seconds": round(paired.warmup_seconds, 1),
        "first_step_seconds": round(paired.first_step_seconds, 2),
        "compile_seconds": (round(paired.first_step_seconds - step_seconds, 1)
                            if cfg.compile else None),
        "profile": None,
    }
    print(f"  {row_name} {switch_name}: ratio {run['ratio']:.3f} (floor "
          f"{run['floor_images_per_second']:.0f}, end to end "
          f"{run['end_to_end_images_per_second']:.0f} img/s)", flush=True)
    if args.profile == "always" or (args.profile == "auto" and run["ratio"] < PROFILE_BELOW):
        suffix = "" if switch_name == "default" else f"_{switch_name}"
        run["profile"] = capture_profiles(learner, paired, cfg,
                                          RESULTS / f"{name}_profile_{row_name}{suffix}.txt")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--switches", default=",".join(SWITCHES),
                        help=f"of {', '.join(SWITCHES)} (compile only where a row allows it)")
    parser.add_argument("--pairs", type=int, default=5, help="floor + epoch pairs per switch")
    parser.add_argument("--seconds", type=float, default=25.0,
                        help="length of each floor run and (about) each epoch")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--augment", default=FitConfig.model_fields["augment"].default)
    parser.add_argument("--photos", type=int, default=2000, help="JPEGs of the ResNet rows")
    parser.add_argument("--name", default="compute_floor")
    args = parser.parse_args()
    rows = args.rows.split(",")
    switches = args.switches.split(",")
    unknown = [r for r in rows if r not in ROWS] + [s for s in switches if s not in SWITCHES]
    if unknown:
        parser.error(f"unknown row or switch: {', '.join(unknown)}")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")

    runs, cache_seconds = [], {}
    resident = loader_module.RESIDENT_SHARE
    with tempfile.TemporaryDirectory(prefix="imagefit-floor-") as scratch:
        photo_folder = Path(scratch) / "photos"
        cache_dir = str(Path(scratch) / "cache")
        for row_name in rows:
            row = ROWS[row_name]
            data = row["data"]
            if data == "photos":
                data = write_photo_folder(photo_folder, args.photos, 256)
            n_rows = None
            for switch_name in switches:
                if switch_name == "compile" and not row["compile"]:
                    continue
                cfg = make_config(row, SWITCHES[switch_name], cache_dir, args.pairs,
                                  args.augment)
                loaded = load_data(data, cfg)
                cache_seconds.setdefault(row_name, round(loaded.cache_seconds, 1))
                device = resolve_device(cfg.device)
                if n_rows is None:
                    default = make_config(row, {}, cache_dir, args.pairs, args.augment)
                    default.image_size, default.channels = cfg.image_size, cfg.channels
                    whole = dataclasses.replace(loaded, train_rows=epoch_rows(
                        loaded.train_rows, cfg.bs * 32))
                    rate = calibrate(default, whole, device, min(args.seconds / 5, 5.0))
                    n_rows = max(2, round(rate * args.seconds / cfg.bs)) * cfg.bs
                    print(f"{row_name}: floor about {rate:.0f} img/s, {n_rows} rows per epoch",
                          flush=True)
                # the split at least 32 batches long, so the default batch size holds
                loaded = dataclasses.replace(
                    loaded, train_rows=epoch_rows(loaded.train_rows, max(n_rows, cfg.bs * 32)),
                    valid_rows=loaded.valid_rows[:0], test_rows=loaded.test_rows[:0])
                print(f"{row_name} {switch_name}", flush=True)
                loader_module.RESIDENT_SHARE = 0.0 if switch_name == "streamed" else resident
                runs.append(measure(args.name, row_name, switch_name, cfg, loaded, device,
                                    n_rows, args))
                loader_module.RESIDENT_SHARE = resident
    write_result(args.name, {
        "command": "bench/compute_floor.py " + " ".join(sys.argv[1:]),
        "pairs": args.pairs, "seconds": args.seconds, "augment": args.augment,
        "photos": args.photos, "profile": args.profile, "profile_below": PROFILE_BELOW,
        "cache_seconds": cache_seconds, "runs": runs,
    })


if __name__ == "__main__":
    main()
