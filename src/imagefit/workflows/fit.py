"""A fit as named steps: ``prepare`` (read, check and cache the data, resolve every option
and build the model, loaders and schedule: all that can fail on the user's input fails here,
before a run directory exists), ``open_run_dir`` (config.yaml with the options as they run),
``train_in_run_dir`` (callbacks, phases, and what a stop or failure leaves) and ``finish``
(in ``record``). Under torchrun each rank runs the same steps on its share of the data."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import distributed, run_records, runs
from ..augment.presets import resolve_augment
from ..config import FitConfig, freeze_options, make_options, refuse_resume_options
from ..data.soft import soft_targets
from ..data.table import Table
from ..devices import resolve_device, resolve_precision
from ..errors import (
    ChecksFailed,
    FitInterrupted,
    ImagefitError,
    ImagefitWarning,
    TrainingDiverged,
)
from ..models import SMALL_IMAGE_MAX
from ..models.groups import layer_groups
from ..report.html import DATA_SUMMARY
from ..report.plots import save_lr_finder_plot
from ..train.budget import Budget, Plan
from ..train.callbacks import RunWriter
from ..train.callbacks.label_correction import check_label_correction
from ..train.callbacks.tracking import end_trackers, require_trackers
from ..train.precompute import supports_precompute
from .build import TrainingParts, build_training, make_learner, make_schedule, monitor_column
from .check import CheckResult, fast_checks, format_check
from .loading import LoadedData, load_data, require_images
from .phases import (
    LR_FIND_BUDGET_SHARE,
    Prepared,
    budget_planner,
    own_callbacks,
    train_phases,
)
from .recipes import AUGMENT_FROM_EPOCHS, apply_pretrained_source
from .record import (
    FitResult,
    finish,
    record_failure,
    run_source,
    run_summary,
    summarize_data,
    write_final_metrics,
    write_report,
)

PLC_MIN_EPOCHS = 10  # the fit length at which --plc was measured to help (noisy_labels)


def run_name(data: str | Path | Table) -> str:
    if isinstance(data, Table):
        return data.description or "arrays"
    text = str(data)
    return text.removeprefix("builtin:") if text.startswith("builtin:") else Path(text).stem


def resume_options(run_dir: Path, overrides: dict[str, Any] | None = None
                   ) -> tuple[str, FitConfig]:
    """The data and options a run was started with, from its config.yaml, with
    ``overrides`` (of ``RESUME_OPTIONS`` only) on top."""
    overrides = overrides or {}
    refuse_resume_options(overrides)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ImagefitError(f"{run_dir} has no config.yaml: it was not made by imagefit fit; "
                            "start a new fit")
    values = run_records.parse_record(path, "restore it from a copy, or start a new fit")
    if not isinstance(values, dict) or "data" not in values:
        raise ImagefitError(f"{path} does not hold the options of a fit (no 'data' key): "
                            "restore it from a copy, or start a new fit")
    data = values.pop("data")
    described = values.pop("data_description", None)
    for recorded_only in ("batch_size_used", "devices"):  # it resumes on the processes given
        values.pop(recorded_only, None)
    if data is None:
        raise ImagefitError(f"{run_dir} was trained on an in-memory table ({described}), "
                            "which cannot be read again: start a new fit")
    try:
        recorded = make_options(FitConfig, values)
    except ImagefitError as error:
        raise ImagefitError(f"{path}: {error}; fix the file or start a new fit") from None
    return str(data), make_options(FitConfig, {**recorded.model_dump(exclude_unset=True),
                                               **overrides})


def run_fit(data: str | Path | Table, cfg: FitConfig, callbacks=(), run_dir: Path | None = None,
            resume_state: dict | None = None, budget: Budget | None = None) -> FitResult:
    """The fit in this process; under torchrun, this rank's part of it (see ``distributed``)."""
    if cfg.devices > 1 and not distributed.launched():
        raise ImagefitError(f"devices={cfg.devices} trains in {cfg.devices} processes: run "
                            f"imagefit fit --devices {cfg.devices}, or start this script with "
                            f"torchrun --nproc_per_node {cfg.devices}")
    cfg = cfg.model_copy()  # resolved in prepare(); the caller's own stays as it was
    if distributed.launched():
        distributed.die_with_launcher()
        distributed.check_devices(distributed.local_world_size(), cfg.device)
        cfg.devices = distributed.world_size()  # as config.yaml records it
    with distributed.process_group(resolve_device(cfg.device)) as device:
        started = time.perf_counter()
        prepared = prepare(device, data, cfg, budget)
        main = distributed.is_main()
        if resume_state is None and main:
            run_dir = open_run_dir(run_dir, data, prepared)
        run_dir = distributed.from_main(run_dir)
        lock = runs.RunLock(run_dir) if main and resume_state is None else \
            contextlib.nullcontext()
        with lock:
            return train_in_run_dir(run_dir, data, prepared, callbacks, resume_state, started)


def prepare(device: torch.device, data: str | Path | Table, cfg: FitConfig,
            budget: Budget | None) -> Prepared:
    """Data read, checked and cached; every option resolved (``cfg`` is changed here and
    nowhere after); model, loaders and schedule built; every option checked that can be: all
    that can fail on the user's input fails here, before a run directory is made."""
    if not distributed.is_main():
        cfg.progress = False
    else:
        runs.output_folder(cfg.runs_dir, "--runs-dir", create=False)
        require_trackers(cfg.log)
    apply_pretrained_source(cfg)
    with distributed.main_first():  # rank 0 builds the image cache, the others then read it
        loaded = load_data(data, cfg)
    if budget is not None:
        budget.exclude(loaded.prepared.cache.built_seconds)  # decoding into the cache, once
    cfg.precision = resolve_precision(cfg.precision, device)
    parts = build_training(cfg, loaded, device, None if budget is None else
                           budget.deadline - time.monotonic())
    check_options_against(cfg, parts)
    if cfg.check:
        require_images(loaded, "--check")
        if loaded.shares is not None:
            raise ImagefitError("--check reads every image, and each machine of this fit holds "
                                "only its share: run imagefit check DATA on one machine, then "
                                "fit without --check")
        run_fast_checks(cfg, loaded, parts)
    if cfg.soft_labels:
        parts.loaders["train"].targets = soft_targets(
            cfg.soft_labels, cfg.soft_alpha, loaded.table, parts.task, loaded.train_rows)
    finder = None
    if cfg.lr == "auto":
        finder = make_learner(cfg, parts).lr_find(
            progress=cfg.progress, seconds=None if budget is None else
            LR_FIND_BUDGET_SHARE * (budget.deadline - time.monotonic()))
        cfg.lr = distributed.from_main(finder.suggestions["valley"])
        if distributed.is_main():
            how = ("the loss did not fall during the sweep: a tenth of the rate where it "
                   "starts to rise") if finder.flat else "the LR finder's valley"
            print(f"lr auto: {cfg.lr:.2e} ({how})")
    epochs, lr_schedule, momentum = make_schedule(cfg, planned=budget is not None)
    if cfg.recipe and "precompute_epochs" not in cfg.model_fields_set:
        # the recipe's step 2, where the model has a separate body and classifier
        cfg.precompute_epochs = 2 if supports_precompute(parts.model) else 0
    if cfg.freeze_epochs is None:  # a pretrained body is frozen for an epoch first
        cfg.freeze_epochs = int(bool(cfg.pretrained))
    if cfg.lr_low is None and not cfg.lr_groups and (cfg.pretrained or cfg.recipe):
        # the body at a 100th
        cfg.lr_low = float(cfg.lr) / 100
    return Prepared(freeze_options(cfg), loaded, parts, epochs, lr_schedule, momentum, finder,
                    budget, notes=loaded.notes)


def run_fast_checks(cfg: FitConfig, loaded: LoadedData, parts: TrainingParts) -> None:
    """--check: the checks of ``imagefit check`` that take seconds, printed as its table;
    a failure stops the fit before its run directory exists."""
    started = time.perf_counter()
    findings = fast_checks(cfg, loaded, parts, resolve_precision(cfg.precision,
                                                                 parts_device(parts)))
    result = CheckResult(None, findings, time.perf_counter() - started)
    if distributed.is_main():
        print(format_check(result))
    if result.failed:
        reasons = "; ".join(f"{f.check}: {f.result}" for f in result.failed)
        raise ChecksFailed(f"--check: {len(result.failed)} check(s) failed, so the fit did "
                           f"not start ({reasons}); see the table above, or run imagefit "
                           "check DATA for every check")


def parts_device(parts: TrainingParts) -> torch.device:
    return next(parts.model.parameters(), torch.zeros(0)).device


def check_options_against(cfg: FitConfig, parts: TrainingParts) -> None:
    """The options that can only be checked against the data and model built from them."""
    if parts.batch_size < distributed.world_size():
        raise ImagefitError(f"a batch of {parts.batch_size} cannot be shared by "
                            f"{distributed.world_size()} processes: give --bs of at least "
                            f"{distributed.world_size()}")
    if cfg.plc:
        check_label_correction(parts.task, parts.pipeline)
        if not cfg.budget and cfg.epochs < PLC_MIN_EPOCHS:
            warnings.warn(f"--plc over {cfg.epochs} epochs: its corrections help once the "
                          "model has learned the clean majority of the labels (+3.6 points at "
                          f"40% noise over {PLC_MIN_EPOCHS} epochs, docs/BENCHMARKS.md); on "
                          "shorter fits they can change more right labels than wrong ones: "
                          f"train for {PLC_MIN_EPOCHS} epochs or more", ImagefitWarning,
                          stacklevel=3)
        if distributed.world_size() > 1:
            raise ImagefitError("--plc corrects labels from the batches of one process: "
                                "train in one process (without --devices)")
    if cfg.recipe and parts.loaders["valid"] is None:
        raise ImagefitError("--recipe stops when validation stops improving: give --valid-pct "
                            "above 0 or a validation split")
    if cfg.early_stop or cfg.keep_best or cfg.plateau:
        monitor_column(cfg, parts)
    if cfg.lr_groups and len(cfg.lr_groups) != len(layer_groups(parts.model)):
        raise ImagefitError(f"option --lr-groups: give {len(layer_groups(parts.model))} rates, "
                            f"one per layer group of {cfg.model} (got {len(cfg.lr_groups)})")


def open_run_dir(run_dir: Path | None, data: str | Path | Table, prepared: Prepared) -> Path:
    """A new run directory (or a fold's, named by the caller) with config.yaml: the options
    as they run, the data, and the batch size --bs auto chose."""
    cfg = prepared.options
    if run_dir is None:
        run_dir = runs.new_run_dir(Path(cfg.runs_dir), cfg.name or run_name(data))
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, data, prepared)
    return run_dir


def write_config(run_dir: Path, data: str | Path | Table, prepared: Prepared) -> None:
    source = None if isinstance(data, Table) else str(data)
    runs.save_yaml(run_dir / "config.yaml", {"data": source, "data_description": run_source(data),
                                             **prepared.options.model_dump(),
                                             "batch_size_used": prepared.parts.batch_size})


def augmentation_by_plan(run_dir: Path, data: str | Path | Table, prepared: Prepared,
                         summary: dict) -> Callable[[Plan, object], bool]:
    """The augmentation a recipe chose for a --budget fit (the small-image recipe's, or the
    photo default's), decided at the first plan (the length of the fit is not known before):
    a fit of fewer than AUGMENT_FROM_EPOCHS epochs trains on without augmentation, as an
    --epochs fit that short does from the start (docs/RECIPES.md); small images then end
    without test-time augmentation too. config.yaml then says so, so that a resumed fit
    continues as it ran. True when it turned test-time augmentation off."""
    def decide(plan: Plan, learner) -> bool:
        epochs = plan.steps / plan.steps_per_epoch
        summary["augmentation_decided"] = {"planned_epochs": round(epochs, 2),
                                           "augmentation": epochs >= AUGMENT_FROM_EPOCHS}
        if epochs >= AUGMENT_FROM_EPOCHS:
            return False
        none = resolve_augment("none")
        learner.pipeline.set_augment(none)
        prepared.loaded.augment = none
        small = prepared.loaded.settings.size <= SMALL_IMAGE_MAX  # the small-image recipe
        update = {"augment": "none", "augment_options": none, **({"tta": False} if small
                                                                 else {})}
        change_options(run_dir, data, prepared, update,
                       f"augmentation off: {epochs:.3g} epochs planned, fewer than "
                       f"{AUGMENT_FROM_EPOCHS} (short fits learn faster without it"
                       f"{'; no test-time augmentation either' if small else ''}: "
                       "docs/RECIPES.md)")
        return small

    return decide


def tta_by_cost(run_dir: Path, data: str | Path | Table, prepared: Prepared,
                summary: dict) -> Callable[[float, float], None]:
    """Test-time augmentation, which the user did not ask for, turned off in a --budget fit
    whose end it would lengthen by more than a ``share`` of the budget
    (phases.TTA_BUDGET_SHARE: those seconds train instead); config.yaml then says so."""
    def drop(seconds: float, share: float) -> None:
        summary["tta_decided"] = {"tta_seconds": round(seconds, 2), "tta": False,
                                  "most_of_the_budget": share}
        change_options(run_dir, data, prepared, {"tta": False},
                       f"test-time augmentation off: it would take about {seconds:.0f} s of "
                       f"the {prepared.options.budget} budget (more than {share:.0%}), which "
                       "trains instead")

    return drop


def change_options(run_dir: Path, data: str | Path | Table, prepared: Prepared, update: dict,
                   line: str) -> None:
    """A decision taken during the fit: the options as they now run, config.yaml rewritten
    (a resumed fit continues as it ran), and the line that says so (rank 0)."""
    prepared.options = prepared.options.model_copy(update=update)
    if distributed.is_main():
        write_config(run_dir, data, prepared)
        print(line, flush=True)


def train_in_run_dir(run_dir: Path, data: str | Path | Table, prepared: Prepared, callbacks,
                     resume_state: dict | None, started: float) -> FitResult:
    """Train, then conclude; Ctrl-C keeps the finished epochs (or, before the first one,
    removes the directory), and any other failure is recorded in metrics.json as
    ``status: failed`` with its message before it is raised."""
    main = distributed.is_main()
    cfg, loaded, parts = prepared.options, prepared.loaded, prepared.parts
    summary = run_summary(data, loaded, parts, prepared.notes)
    writer = RunWriter(run_dir, parts.model_info)
    learner = None
    own: list = []
    try:
        if prepared.finder is not None and main:
            save_lr_finder_plot(prepared.finder, run_dir / "plots" / "lr_find.png")
        if main and cfg.report and not (run_dir / DATA_SUMMARY).is_file():
            summarize_data(run_dir, loaded, parts, cfg.seed)
        own, best = own_callbacks(run_dir, cfg, loaded, parts, writer)
        test_loader = parts.loaders["test"]
        extra = {"test": test_loader} if cfg.test_every_epoch and test_loader else {}
        planner = None
        if prepared.budget is not None and resume_state is None:  # a resumed fit keeps it
            planner = budget_planner(
                cfg, loaded, parts, prepared.budget.deadline, len(extra) * len(loaded.test_rows),
                augmentation_by_plan(run_dir, data, prepared, summary)
                if loaded.augment_until_plan else None,
                drop_tta=tta_by_cost(run_dir, data, prepared, summary)
                if cfg.tta and not loaded.tta_asked else None,
                budget_seconds=prepared.budget.seconds)
        learner = make_learner(cfg, parts, [*own, *callbacks], extra_loaders=extra)
        if resume_state is not None:
            learner.load_checkpoint_state(resume_state)
            writer.epochs_saved = len(learner.history)
            if main:
                runs.write_metrics_rows(run_dir, learner.history)
                print(f"resuming {run_dir} after epoch {len(learner.history)}")
        train_phases(learner, cfg, prepared.epochs, prepared.lr_schedule, prepared.momentum,
                     summary, resuming=resume_state is not None, planner=planner)
        result = finish(run_dir, prepared, learner, best, planner, summary, started)
        end_trackers(own, result.metrics)
        return result
    except KeyboardInterrupt:
        end_trackers(own, status="KILLED")
        if not main:
            raise
        if writer.epochs_saved == 0 and resume_state is None:
            runs.remove_run_dir(run_dir)
            raise FitInterrupted(None, 0) from None
        del learner.history[writer.epochs_saved:]  # an epoch not on disk did not finish
        write_final_metrics(run_dir, learner, summary, started, status="interrupted")
        write_report(run_dir, learner, cfg)
        raise FitInterrupted(run_dir, writer.epochs_saved) from None
    except RuntimeError as error:
        end_trackers(own, status="FAILED")
        if not distributed.lost_peer(error):
            record_failure(run_dir, learner, writer, summary, started, error)
            raise
        failure = ImagefitError(
            f"rank {distributed.rank()} lost contact with the others (a process died?): "
            f"{run_dir} keeps the last finished epoch; resume with imagefit fit --resume "
            f"{run_dir} --devices {cfg.devices}")
        record_failure(run_dir, learner, writer, summary, started, failure)
        raise failure from error
    except TrainingDiverged as error:
        end_trackers(own, status="FAILED")
        kept = (f"{run_dir} keeps epoch {writer.epochs_saved}, the last finished one"
                if writer.epochs_saved else f"{run_dir} is marked failed (no epoch finished)")
        failure = TrainingDiverged(f"{error}; {kept}")
        record_failure(run_dir, learner, writer, summary, started, failure)
        raise failure from None
    except BaseException as error:
        end_trackers(own, status="FAILED")
        record_failure(run_dir, learner, writer, summary, started, error)
        raise
