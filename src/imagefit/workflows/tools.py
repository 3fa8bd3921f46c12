"""The LR finder and the batch preview as commands: the model and data a fit would use,
without a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import runs
from ..augment.pipeline import BatchPipeline
from ..config import FitConfig, ShowBatchOptions, merge_options, refuse_unused
from ..data.table import Table
from ..devices import resolve_device
from ..report.plots import save_image_grid, save_lr_finder_plot
from ..tasks import Task
from ..train.lr_finder import LRFinderResult
from .build import build_training, make_learner
from .loading import load_data, require_images
from .recipes import apply_pretrained_source
from .record import run_source

# Fit options the sweep has no use for: it trains a few hundred steps at rising rates in
# one process, with no schedule, phases, callbacks, weight averaging, measurement or run
# directory.
LR_FIND_UNUSED = ("lr", "schedule", "pct_start", "freeze_epochs", "precompute_epochs",
                  "lr_low", "lr_groups", "recipe", "early_stop", "plateau", "keep_best",
                  "plc", "soft_labels", "tta", "tta_n", "tta_augment", "test_every_epoch",
                  "report", "log", "check", "name", "runs_dir", "devices", "ema")


def lr_find(data: str | Path | Table, out: str | Path | None = "lr_find.png",
            config: FitConfig | None = None, **options: Any) -> LRFinderResult:
    """Run the LR finder on ``data`` with the model and options a fit would use, save its plot
    with the suggestions marked to ``out``, and return the sweep and its suggestions."""
    cfg: FitConfig = merge_options(FitConfig, config, options)
    refuse_unused(cfg, LR_FIND_UNUSED, "lr-find sweeps the rate over the first steps of one "
                  "process, without the fit's schedule, phases or outputs")
    if out is not None:
        out = runs.output_file(out, "--out", "lr_find.png")
    apply_pretrained_source(cfg)
    loaded = load_data(data, cfg)
    parts = build_training(cfg, loaded, resolve_device(cfg.device))
    result = make_learner(cfg, parts).lr_find(progress=cfg.progress)
    if out is not None:
        save_lr_finder_plot(result, Path(out))
    return result


def show_batch(data: str | Path | Table, out: str | Path,
               options: ShowBatchOptions | None = None, **overrides: Any) -> Path:
    """Save a grid of augmented (and mixed) training images with their labels, as the model
    would see them before normalization; ``same_image`` augments one image many times."""
    cfg: ShowBatchOptions = merge_options(ShowBatchOptions, options, overrides)
    out = runs.output_file(out, "--out", "batch.png")
    loaded = load_data(data, cfg)
    require_images(loaded, "show-batch")
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = loaded.train_rows
    if cfg.same_image:
        rows = np.repeat(rows[int(torch.randint(len(rows), (1,), generator=generator))],
                         cfg.n_images)
    else:
        rows = rows[torch.randperm(len(rows), generator=generator)[:cfg.n_images].numpy()]
    task = Task(loaded.table.task.kind, list(loaded.table.task.names))
    task.fit_target_scaling(loaded.table.targets[loaded.train_rows])
    targets = task.encode_targets(loaded.table.targets[rows])
    images = loaded.prepared.cache.tensor()[torch.as_tensor(rows)].permute(0, 3, 1, 2)
    channels = images.shape[1]
    pipeline = BatchPipeline([0.0] * channels, [1.0] * channels, loaded.augment,
                             lighting=loaded.lighting, n_classes=task.n_out)
    size = cfg.image_sizes[-1] if cfg.image_sizes else None
    batch, mixed = pipeline.train_batch(images, targets, generator, size=size)
    title = f"{run_source(data)}: augment {cfg.augment}" + (
        " (one image)" if cfg.same_image else "")
    return save_image_grid(batch, task.describe_targets(mixed), out, title=title)
