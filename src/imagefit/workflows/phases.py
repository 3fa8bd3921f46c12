"""The training phases of a fit (head on precomputed features, frozen body, everything at
spread rates, or the recipe's SGDR cycles), the callbacks its options ask for, and the planner
of a --budget fit."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import distributed
from ..config import FitConfig, RunOptions
from ..forward import TTA, model_outputs
from ..tasks import HIGHER_IS_BETTER
from ..train import budget, schedules
from ..train.budget import Budget, BudgetPlanner
from ..train.callbacks import (
    BestCheckpoint,
    Callback,
    EarlyStopping,
    MixOff,
    ProgressCallback,
    ProgressiveLabelCorrection,
    ProgressiveResize,
    ReduceOnPlateau,
    RunWriter,
    SnapshotSaver,
)
from ..train.callbacks.base import callback_order
from ..train.callbacks.tracking import make_trackers
from ..train.learner import Learner
from ..train.lr_finder import LRFinderResult
from ..train.precompute import fit_head_on_features
from ..train.schedules import Schedule
from .build import TrainingParts, monitor_column
from .loading import LoadedData

FINAL_SAMPLE = 1024  # images timed to plan a --budget fit's final evaluation, at most
# seconds of that timing: the 1024 images took 12 s with TTA at 64 px (Lite0, 2 CPU cores),
# a fifth of a 1-minute budget, before it was bounded
FINAL_TIMING_SECONDS = 1.5
# the most of a --budget that test-time augmentation may add to the end of the fit: Lite0's
# 4 versions of 2,400 images at 64 px took 20 s of a 1-minute budget on 2 CPU cores, which
# left half an epoch to fine-tune every layer (docs/RECIPES.md, "Photos")
TTA_BUDGET_SHARE = 0.1
# the most of what is left of a --budget that a fine-tune's frozen epochs may take (fastai's
# fine_tune gives one frozen epoch to a few unfrozen ones); a planner cuts them to it
FROZEN_BUDGET_SHARE = 0.2
# the most of what is left of a --budget that --lr auto's sweep may take: its 200 steps of
# Lite0 on 2,000 images at 64 px took over a minute on 2 CPU cores before it was bounded
LR_FIND_BUDGET_SHARE = 0.1


@dataclass
class Prepared:
    """A fit assembled and checked, before its run directory exists: the options as they
    run (frozen), the data, the model and loaders, the schedule, the LR sweep of --lr auto
    and the --budget clock."""

    options: RunOptions
    loaded: LoadedData
    parts: TrainingParts
    epochs: int
    lr_schedule: Schedule
    momentum: Schedule | None
    finder: LRFinderResult | None
    budget: Budget | None
    notes: dict



def train_phases(learner: Learner, cfg: FitConfig, epochs: int, lr_schedule: Schedule,
           momentum: Schedule | None, summary: dict, resuming: bool,
           planner: BudgetPlanner | None = None) -> None:
    """The phases of a fit: head on precomputed features, frozen head, then everything
    (with discriminative rates), as one schedule or, with --recipe, SGDR cycles until the
    validation metric stops improving."""
    lr = float(cfg.lr)
    if cfg.precompute_epochs and not resuming:
        summary["feature_seconds"] = round(
            fit_head_on_features(learner, cfg.precompute_epochs, lr), 3)
    if cfg.freeze_epochs:
        learner.freeze(cfg.train_bn)
        own = learner.callbacks
        frozen = None
        if planner is not None:  # within the budget: at most a share of it
            frozen = planner.phase(FROZEN_BUDGET_SHARE,
                                   cfg.freeze_epochs * len(learner.train_loader))
            learner.callbacks = sorted([*own, frozen], key=callback_order)
        try:
            learner.fit(cfg.freeze_epochs, schedules.one_cycle(lr, cfg.pct_start),
                        schedules.one_cycle_momentum(pct_start=cfg.pct_start))
        finally:
            learner.callbacks = own
        if frozen is not None:
            summary["frozen_budget"] = frozen.summary()
        learner.unfreeze()
    if cfg.lr_groups:
        learner.group_lrs(cfg.lr_groups)
    elif cfg.lr_low:
        learner.discriminative(cfg.lr_low, lr)
    if not cfg.recipe:
        if planner is not None:  # the budget plans the main fit, after the phases before it
            learner.callbacks = sorted([*learner.callbacks, planner], key=callback_order)
        learner.fit(epochs, lr_schedule, momentum)
        return
    column = f"valid_{learner.task.main_metric}"
    higher = HIGHER_IS_BETTER[learner.task.main_metric]
    best = None
    for cycle in range(cfg.recipe_max_cycles):
        history = learner.fit(cfg.cycle_len * cfg.cycle_mult**cycle,
                              schedules.cosine(lr, lr / 1e3))
        value = history[-1][column]
        if best is not None and (value <= best if higher else value >= best):
            summary["recipe_cycles"] = cycle + 1
            return
        best = value
    summary["recipe_cycles"] = cfg.recipe_max_cycles


def own_callbacks(run_dir: Path, cfg: FitConfig, loaded: LoadedData, parts: TrainingParts,
                   writer: RunWriter) -> tuple[list[Callback], BestCheckpoint | None]:
    """The callbacks the options ask for (rank 0 alone writes), and the best-epoch keeper."""
    main = distributed.is_main()
    own: list[Callback] = [ProgressCallback(cfg.progress, run_dir / "log.txt"), writer] \
        if main else []
    if cfg.image_sizes:
        own.append(ProgressiveResize(cfg.image_sizes))
    if loaded.augment.mix_off_epochs:
        own.append(MixOff(loaded.augment.mix_off_epochs))
    if cfg.plc:
        own.append(ProgressiveLabelCorrection(
            cfg.plc_warmup, cfg.plc_theta_start, cfg.plc_theta_end, cfg.plc_schedule,
            run_dir=run_dir, paths=loaded.table.paths))
    if cfg.schedule == "sgdr" and cfg.snapshots and main:
        ends = schedules.sgdr_cycle_ends(cfg.sgdr_cycles, cfg.cycle_len, cfg.cycle_mult)
        own.append(SnapshotSaver(run_dir, parts.model_info, ends))
    if cfg.log and main:
        own.extend(make_trackers(cfg.log, run_dir, cfg.model_dump(), Path(cfg.runs_dir)))
    best = None
    if cfg.early_stop or cfg.keep_best or cfg.plateau:
        monitor, mode = monitor_column(cfg, parts)
        if cfg.plateau:
            own.append(ReduceOnPlateau(monitor, mode, cfg.plateau, cfg.plateau_factor,
                                       cfg.min_delta))
        if cfg.early_stop:
            own.append(EarlyStopping(monitor, mode, cfg.early_stop, cfg.min_delta))
        if cfg.keep_best and main:  # the other ranks take rank 0's final weights
            best = BestCheckpoint(run_dir, parts.model_info, monitor, mode, restore=True)
            own.append(best)
    return own, best


def budget_planner(cfg: FitConfig, loaded, parts, deadline: float,
                   every_epoch_images: int,
                   first_plan: Callable[[budget.Plan, Learner], bool] | None = None,
                   drop_tta: Callable[[float, float], None] | None = None,
                   budget_seconds: float = float("inf")) -> BudgetPlanner:
    """The planner of a --budget fit: the end evaluates the validation and test splits (timed
    on a sample, test-time augmentation included, as ``conclude`` will) and every epoch
    validates. ``first_plan``: told the first plan; True when it turned test-time
    augmentation off. ``drop_tta``: called with the seconds test-time augmentation would
    add to the end and TTA_BUDGET_SHARE when they exceed that share of ``budget_seconds``
    (it turns it off). After either, the end is timed again and the fit planned anew."""
    n_valid, n_test = len(loaded.valid_rows), len(loaded.test_rows)
    sample = np.concatenate([loaded.test_rows, loaded.valid_rows])[:FINAL_SAMPLE]
    if loaded.shares is not None:  # a shard times rows it holds
        sample = np.concatenate([loaded.own_rows("test")[0],
                                 loaded.own_rows("valid")[0]])[:FINAL_SAMPLE]
    timed = {"tta": TTA.from_options(cfg, loaded.augment) if cfg.tta_n else None}
    images = loaded.prepared.cache.tensor()

    def time_final(learner: Learner) -> float:
        tta = timed["tta"]
        if not len(sample):
            return float("inf")
        model = learner.eval_model
        chunk = min(2 * parts.batch_size, len(sample))

        def outputs(rows: np.ndarray) -> None:
            model_outputs(model, parts.pipeline, parts.task, images, rows, chunk, tta,
                          plain_too=tta is not None, precision=cfg.precision,
                          places=loaded.places)

        outputs(sample[:chunk])  # a warm-up batch
        started, timed_rows = time.perf_counter(), 0
        while timed_rows < len(sample) and (
                timed_rows == 0 or time.perf_counter() - started < FINAL_TIMING_SECONDS):
            rows = sample[timed_rows:timed_rows + chunk]
            outputs(rows)
            timed_rows += len(rows)
        return timed_rows / (time.perf_counter() - started)

    def told(plan: budget.Plan, learner: Learner) -> bool:
        turned_off = first_plan is not None and first_plan(plan, learner)
        tta = timed["tta"]
        if not turned_off and tta is not None and drop_tta is not None:
            extra = planner.evaluation_seconds() * tta.n / (tta.n + 1)
            if extra > TTA_BUDGET_SHARE * budget_seconds:
                drop_tta(extra, TTA_BUDGET_SHARE)
                turned_off = True
        if turned_off:
            timed["tta"] = None
            planner.time_end(learner)
        return turned_off

    planner = BudgetPlanner(deadline, final_images=n_valid + n_test,
                            n_valid=n_valid + every_epoch_images, time_final=time_final,
                            fixed_seconds=budget.EXIT_SECONDS + (
                                budget.FINAL_FIXED_SECONDS if cfg.report else 2.0),
                            budget_text=cfg.budget or "",
                            announce=cfg.progress and distributed.is_main(),
                            first_plan=told if first_plan or drop_tta else None)
    return planner


def budget_line(record: dict) -> str:
    plan = record.get("plan")
    line = (f"budget {record['budget']}: the run took "
            f"{budget.format_duration(record['used_seconds'])}")
    if plan:
        line += (f"; trained {plan['steps']} steps ({plan['steps'] / plan['steps_per_epoch']:.3g}"
                 f" epochs) at {plan['step_seconds'] * 1000:.3g} ms a step")
    if record.get("stopped_at_deadline"):
        line += "; stopped at the deadline before the planned end"
    return line
