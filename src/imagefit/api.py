"""The public training functions: ``fit``, ``resume``, ``lr_find`` and ``show_batch``
(``predict``, ``evaluate`` and ``load_model`` live in ``inference``).

``fit`` builds source -> cache -> loader -> pipeline -> model -> learner (see ``build``),
attaches the callbacks that write the run directory and runs the phases of the recipe.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from . import distributed, runs
from .augment.pipeline import BatchPipeline
from .build import (
    LoadedData,
    TrainingParts,
    apply_pretrained_source,
    apply_recipe,
    build_training,
    load_data,
    make_learner,
    make_schedule,
    monitor_column,
)
from .conclude import conclude
from .config import (
    FitConfig,
    ShowBatchOptions,
    make_options,
    merge_options,
)
from .data.soft import soft_targets
from .data.sources import Table
from .devices import resolve_device, resolve_precision
from .errors import FitInterrupted, ImagefitError, ImagefitWarning, TrainingDiverged
from .inference import TTA, model_outputs
from .models.groups import layer_groups
from .report.dataset import summarize_dataset
from .report.html import DATA_SUMMARY, write_report
from .report.plots import (
    save_image_grid,
    save_lr_finder_plot,
    save_metrics_plot,
    save_training_plot,
)
from .tasks import HIGHER_IS_BETTER, Task
from .train import budget, schedules
from .train.budget import BudgetPlanner
from .train.callbacks import (
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
from .train.callbacks.base import callback_order
from .train.callbacks.label_correction import check_label_correction
from .train.learner import Learner
from .train.lr_finder import LRFinderResult
from .train.precompute import fit_head_on_features, supports_precompute
from .train.schedules import Schedule

PLC_MIN_EPOCHS = 10  # the fit length at which --plc was measured to help (noisy_labels)
FINAL_SAMPLE = 1024  # images timed to plan a --budget fit's final evaluation


@dataclass
class FitResult:
    """What ``fit`` returns: the run directory, final metrics, per-epoch history, model."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict]
    model: nn.Module
    # raw outputs of the final model per split: {"valid": (table rows, outputs), ...}
    outputs: dict[str, tuple[np.ndarray, torch.Tensor]] = field(default_factory=dict)


def _run_name(data: str | Path | Table) -> str:
    if isinstance(data, Table):
        return data.description or "arrays"
    text = str(data)
    return text.removeprefix("builtin:") if text.startswith("builtin:") else Path(text).stem


def fit(data: str | Path | Table, config: FitConfig | None = None, *,
        callbacks: list[Callback] | tuple = (), **options: Any) -> FitResult:
    """Train a model on ``data`` (``builtin:NAME``, a folder, a CSV or a ``Table`` from
    ``from_arrays``) and write a run directory; ``options`` override ``config``'s fields and
    ``callbacks`` join the learner's own."""
    cfg: FitConfig = merge_options(FitConfig, config, options)
    apply_recipe(cfg)
    return _fit(data, cfg, callbacks, budget_window=budget_window(cfg))


def budget_window(cfg: FitConfig) -> tuple[float, float] | None:
    """When a --budget command started and must end (``time.monotonic`` readings), after
    checking that the options go with a budget; None without one."""
    if not cfg.budget:
        return None
    started = budget.command_start()  # taken first: an error below must not leave it behind
    seconds = budget.parse_duration(cfg.budget)
    if "epochs" in cfg.model_fields_set:
        raise ImagefitError(f"--epochs {cfg.epochs} and --budget {cfg.budget} both set how long "
                            "training lasts: give one of them")
    if cfg.recipe:
        raise ImagefitError("--recipe trains SGDR cycles until validation stops improving, "
                            "which a budget cannot plan: leave out --recipe or --budget")
    return started, started + seconds


def _train(learner: Learner, cfg: FitConfig, epochs: int, lr_schedule: Schedule,
           momentum: Schedule | None, summary: dict, resuming: bool,
           planner: BudgetPlanner | None = None) -> None:
    """The phases of a fit: head on precomputed features, frozen head, then everything
    (with discriminative rates), as one schedule or, with --recipe, SGDR cycles until the
    validation metric stops improving."""
    lr = float(cfg.lr)
    if cfg.precompute_epochs and not resuming:
        summary["feature_seconds"] = round(
            fit_head_on_features(learner, cfg.precompute_epochs, lr), 3)
    freeze_epochs = cfg.freeze_epochs if cfg.freeze_epochs is not None else int(
        bool(cfg.pretrained))
    if freeze_epochs:
        learner.freeze(cfg.train_bn)
        learner.fit(freeze_epochs, schedules.one_cycle(lr, cfg.pct_start),
                    schedules.one_cycle_momentum(pct_start=cfg.pct_start))
        learner.unfreeze()
    lr_low = cfg.lr_low or (lr / 100 if cfg.pretrained or cfg.recipe else None)
    if cfg.lr_groups:
        learner.group_lrs(cfg.lr_groups)
    elif lr_low:
        learner.discriminative(lr_low, lr)
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


def resume(run: str | Path, callbacks: list[Callback] | tuple = ()) -> FitResult:
    """Continue a stopped or killed fit from its last finished epoch, in the same run
    directory: model, optimizer, schedule position, random state and metrics so far. The
    run is locked while it trains, so a run still being written cannot be resumed."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ImagefitError(f"run {run_dir} not found: give a run directory made by "
                            "imagefit fit")
    runs.require_checkpoint(run_dir)  # before the lock file: a folder of another kind stays
    with runs.RunLock(run_dir) if distributed.is_main() else contextlib.nullcontext():
        if distributed.is_main():
            runs.remove_partial_files(run_dir)  # of a write the stopped fit was killed in
        state = runs.load_checkpoint(run_dir)
        data, cfg = _resume_options(run_dir)
        return _fit(data, cfg, callbacks, run_dir=run_dir, resume_state=state)


def _resume_options(run_dir: Path) -> tuple[str, FitConfig]:
    """The data and options a run was started with, from its config.yaml."""
    path = run_dir / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ImagefitError(f"{run_dir} has no config.yaml: it was not made by imagefit fit; "
                            "start a new fit") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise ImagefitError(f"{path} is damaged (not readable YAML): restore it from a copy, "
                            "or start a new fit") from None
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
        return str(data), make_options(FitConfig, values)
    except ImagefitError as error:
        raise ImagefitError(f"{path}: {error}; fix the file or start a new fit") from None


def _fit(data: str | Path | Table, cfg: FitConfig, callbacks=(), run_dir: Path | None = None,
         resume_state: dict | None = None,
         budget_window: tuple[float, float] | None = None) -> FitResult:
    """The fit in this process; under torchrun, this rank's part of it (see ``distributed``)."""
    if cfg.devices > 1 and not distributed.launched():
        raise ImagefitError(f"devices={cfg.devices} trains in {cfg.devices} processes: run "
                            f"imagefit fit --devices {cfg.devices}, or start this script with "
                            f"torchrun --nproc_per_node {cfg.devices}")
    if distributed.launched():
        distributed.die_with_launcher()
        distributed.check_devices(distributed.local_world_size(), cfg.device)
        cfg.devices = distributed.world_size()  # as config.yaml records it
    with distributed.process_group(resolve_device(cfg.device)) as device:
        return _fit_on(device, data, cfg, callbacks, run_dir, resume_state, budget_window)


@dataclass
class _Prepared:
    """A fit assembled and checked, before its run directory exists."""

    loaded: LoadedData
    parts: TrainingParts
    epochs: int
    lr_schedule: Schedule
    momentum: Schedule | None
    finder: LRFinderResult | None
    deadline: float | None
    not_counted: float
    notes: dict


def _fit_on(device: torch.device, data: str | Path | Table, cfg: FitConfig, callbacks=(),
            run_dir: Path | None = None, resume_state: dict | None = None,
            budget_window: tuple[float, float] | None = None) -> FitResult:
    """Prepare and check everything, then open the run directory (locked while it is
    written) and train; a failure after that is recorded in the run directory."""
    started = time.perf_counter()
    prepared = _prepare(device, data, cfg, budget_window)
    main = distributed.is_main()
    if resume_state is None and main:
        run_dir = _open_run_dir(run_dir, data, cfg, prepared)
    run_dir = distributed.from_main(run_dir)
    lock = runs.RunLock(run_dir) if main and resume_state is None else contextlib.nullcontext()
    with lock:
        return _train_in_run_dir(run_dir, data, cfg, prepared, callbacks, resume_state,
                                 budget_window, started)


def _prepare(device: torch.device, data: str | Path | Table, cfg: FitConfig,
             budget_window: tuple[float, float] | None) -> _Prepared:
    """Data read, checked and cached; model, loaders and schedule built; every option
    checked that can be: all that can fail on the user's input fails here, before a run
    directory is made."""
    if not distributed.is_main():
        cfg.progress = False
    else:
        runs.output_folder(cfg.runs_dir, "--runs-dir", create=False)
    apply_pretrained_source(cfg)
    with distributed.main_first():  # rank 0 builds the image cache, the others then read it
        loaded = load_data(data, cfg)
    not_counted = loaded.prepared.cache.built_seconds  # decoding into the cache, once
    deadline = None if budget_window is None else budget_window[1] + not_counted
    cfg.precision = resolve_precision(cfg.precision, device)  # as config.yaml records it
    parts = build_training(cfg, loaded, device)
    _check_options_against(cfg, parts)
    if cfg.soft_labels:
        parts.loaders["train"].targets = soft_targets(
            cfg.soft_labels, cfg.soft_alpha, loaded.table, parts.task, loaded.train_rows)
    finder = None
    if cfg.lr == "auto":
        finder = make_learner(cfg, parts).lr_find(progress=cfg.progress)
        cfg.lr = distributed.from_main(finder.suggestions["valley"])
        if distributed.is_main():
            how = ("the loss did not fall during the sweep: a tenth of the rate where it "
                   "starts to rise") if finder.flat else "the LR finder's valley"
            print(f"lr auto: {cfg.lr:.2e} ({how})")
    epochs, lr_schedule, momentum = make_schedule(cfg, planned=deadline is not None)
    if cfg.recipe and "precompute_epochs" not in cfg.model_fields_set:
        # the recipe's step 2, where the model has a separate body and classifier
        cfg.precompute_epochs = 2 if supports_precompute(parts.model) else 0
    return _Prepared(loaded, parts, epochs, lr_schedule, momentum, finder, deadline,
                     not_counted, notes=loaded.notes)


def _check_options_against(cfg: FitConfig, parts: TrainingParts) -> None:
    """The options that can only be checked against the data and model built from them."""
    if parts.batch_size < distributed.world_size():
        raise ImagefitError(f"a batch of {parts.batch_size} cannot be shared by "
                            f"{distributed.world_size()} processes: give --bs of at least "
                            f"{distributed.world_size()}")
    if cfg.soft_labels and cfg.plc:
        raise ImagefitError("--soft-labels and --plc both change the training labels: "
                            "choose one")
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


def _open_run_dir(run_dir: Path | None, data: str | Path | Table, cfg: FitConfig,
                  prepared: _Prepared) -> Path:
    """A new run directory (or a fold's, named by the caller) with config.yaml written."""
    runs_dir = Path(cfg.runs_dir)
    if run_dir is None:
        run_dir = runs.new_run_dir(runs_dir, cfg.name or _run_name(data))
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    source = None if isinstance(data, Table) else str(data)
    runs.save_yaml(run_dir / "config.yaml", {"data": source, "data_description": _run_source(data),
                                             **cfg.model_dump(),
                                             "batch_size_used": prepared.parts.batch_size})
    return run_dir


def _train_in_run_dir(run_dir: Path, data: str | Path | Table, cfg: FitConfig,
                      prepared: _Prepared, callbacks, resume_state: dict | None,
                      budget_window: tuple[float, float] | None, started: float) -> FitResult:
    """Train, then conclude; Ctrl-C keeps the finished epochs (or, before the first one,
    removes the directory), and any other failure is recorded in metrics.json as
    ``status: failed`` with its message before it is raised."""
    main = distributed.is_main()
    loaded, parts = prepared.loaded, prepared.parts
    summary = _run_summary(data, loaded, parts, prepared.notes)
    writer = RunWriter(run_dir, parts.model_info)
    learner = None
    try:
        if prepared.finder is not None and main:
            save_lr_finder_plot(prepared.finder, run_dir / "plots" / "lr_find.png")
        if main and cfg.report and not (run_dir / DATA_SUMMARY).is_file():
            _summarize_data(run_dir, loaded, parts, cfg.seed)
        own, best = _own_callbacks(run_dir, cfg, loaded, parts, writer)
        test_loader = parts.loaders["test"]
        extra = {"test": test_loader} if cfg.test_every_epoch and test_loader else {}
        planner = None
        if prepared.deadline is not None and resume_state is None:  # a resumed fit keeps it
            planner = _budget_planner(cfg, loaded, parts, prepared.deadline,
                                      len(extra) * len(loaded.test_rows))
        learner = make_learner(cfg, parts, [*own, *callbacks], extra_loaders=extra)
        if resume_state is not None:
            learner.load_checkpoint_state(resume_state)
            writer.epochs_saved = len(learner.history)
            if main:
                runs.write_metrics_rows(run_dir, learner.history)
                print(f"resuming {run_dir} after epoch {len(learner.history)}")
        _train(learner, cfg, prepared.epochs, prepared.lr_schedule, prepared.momentum,
               summary, resuming=resume_state is not None, planner=planner)
        return _finish(run_dir, cfg, prepared, learner, best, planner, summary, budget_window,
                       started)
    except KeyboardInterrupt:
        if not main:
            raise
        if writer.epochs_saved == 0 and resume_state is None:
            runs.remove_run_dir(run_dir)
            raise FitInterrupted(None, 0) from None
        del learner.history[writer.epochs_saved:]  # an epoch not on disk did not finish
        _write_final_metrics(run_dir, learner, summary, started, status="interrupted")
        _write_report(run_dir, learner, cfg)
        raise FitInterrupted(run_dir, writer.epochs_saved) from None
    except RuntimeError as error:
        if not distributed.lost_peer(error):
            _record_failure(run_dir, learner, writer, summary, started, error)
            raise
        failure = ImagefitError(
            f"rank {distributed.rank()} lost contact with the others (a process died?): "
            f"{run_dir} keeps the last finished epoch; resume with imagefit fit --resume "
            f"{run_dir} --devices {cfg.devices}")
        _record_failure(run_dir, learner, writer, summary, started, failure)
        raise failure from error
    except TrainingDiverged as error:
        kept = (f"{run_dir} keeps epoch {writer.epochs_saved}, the last finished one"
                if writer.epochs_saved else f"{run_dir} is marked failed (no epoch finished)")
        failure = TrainingDiverged(f"{error}; {kept}")
        _record_failure(run_dir, learner, writer, summary, started, failure)
        raise failure from None
    except BaseException as error:
        _record_failure(run_dir, learner, writer, summary, started, error)
        raise


def _record_failure(run_dir: Path, learner: Learner | None, writer: RunWriter, summary: dict,
                    started: float, error: BaseException) -> None:
    """metrics.json of a failed run: status 'failed', the error, the epochs kept."""
    if not distributed.is_main():
        return
    if learner is not None:
        del learner.history[writer.epochs_saved:]
    message = str(error).strip() or type(error).__name__
    _write_final_metrics(run_dir, learner, {**summary, "error": message}, started,
                         status="failed")
    with open(run_dir / "log.txt", "a") as log:
        log.write(f"failed: {message}\n")


def _run_summary(data: str | Path | Table, loaded: LoadedData, parts: TrainingParts,
                 notes: dict) -> dict:
    """What metrics.json says of the data, before the figures are added."""
    table, prepared = loaded.table, loaded.prepared
    return {
        "data": _run_source(data),
        "task": parts.task.kind,
        "n_train": len(loaded.train_rows), "n_valid": len(loaded.valid_rows),
        **({"n_train_sampled": parts.n_train_sampled} if parts.n_train_sampled else {}),
        "n_test": len(loaded.test_rows),
        "skipped_files": len(prepared.cache.errors),
        "skipped": [table.paths[r] for r in prepared.cache.failed] if table.paths else [],
        "cache_seconds": round(loaded.cache_seconds, 3),
        **notes,
    }


def _own_callbacks(run_dir: Path, cfg: FitConfig, loaded: LoadedData, parts: TrainingParts,
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


def _finish(run_dir: Path, cfg: FitConfig, prepared: _Prepared, learner: Learner,
            best: BestCheckpoint | None, planner: BudgetPlanner | None, summary: dict,
            budget_window: tuple[float, float] | None, started: float) -> FitResult:
    """The final model (EMA or best epoch), its evaluation, metrics.json and the report."""
    main = distributed.is_main()
    parts, loaded = prepared.parts, prepared.loaded
    if main:
        runs.save_steps(run_dir, learner.step_log)
        save_training_plot(learner.step_log, learner.history,
                           run_dir / "plots" / "training.png")
    if learner.ema is not None:  # the model ends with the averaged weights it was judged on
        parts.model.load_state_dict(learner.ema.module.state_dict())
    final_row = learner.history[-1]
    if best is not None and best.best_epoch:  # the model now holds the best epoch's weights
        final_row = learner.history[best.best_epoch - 1]
        runs.save_model(run_dir, parts.model, {**parts.model_info,
                                               "epochs_trained": best.best_epoch})
        summary["best_epoch"] = best.best_epoch
    distributed.share_weights(parts.model)  # every rank concludes with rank 0's final model
    concluding = time.perf_counter()
    figures, outputs = conclude(run_dir, cfg, parts, loaded, parts.model)
    summary.update(figures)
    if planner is not None:
        summary["budget"] = {"budget": cfg.budget,
                             "budget_seconds": round(budget_window[1] - budget_window[0], 3),
                             "not_counted_seconds": round(prepared.not_counted, 3),
                             **planner.summary()}
    metrics = _write_final_metrics(run_dir, learner, summary, started, status="done",
                                   final_row=final_row)
    _write_report(run_dir, learner, cfg)
    metrics["final_seconds"] = round(time.perf_counter() - concluding, 3)
    if planner is not None:
        used = time.monotonic() - budget_window[0] - prepared.not_counted
        metrics["budget"]["used_seconds"] = round(used, 3)
        if main:
            print(_budget_line(metrics["budget"]))
    if main:
        runs.save_json(run_dir / "metrics.json", metrics)
    return FitResult(run_dir=run_dir, metrics=metrics, history=learner.history,
                     model=parts.model, outputs=outputs)


def _budget_planner(cfg: FitConfig, loaded, parts, deadline: float,
                    every_epoch_images: int) -> BudgetPlanner:
    """The planner of a --budget fit: the end evaluates the validation and test splits (timed
    on a sample, test-time augmentation included, as ``conclude`` will) and every epoch
    validates."""
    n_valid, n_test = len(loaded.valid_rows), len(loaded.test_rows)
    sample = np.concatenate([loaded.test_rows, loaded.valid_rows])[:FINAL_SAMPLE]
    tta = TTA.from_options(cfg, loaded.augment) if cfg.tta_n else None
    images = loaded.prepared.cache.tensor()

    def time_final(learner: Learner) -> float:
        if not len(sample):
            return float("inf")
        model = learner.eval_model
        batch = max(parts.batch_size, 256)
        model_outputs(model, parts.pipeline, parts.task, images, sample[:batch], batch, tta,
                      precision=cfg.precision)
        started = time.perf_counter()  # after a warm-up batch
        model_outputs(model, parts.pipeline, parts.task, images, sample, batch, tta,
                      plain_too=tta is not None, precision=cfg.precision)
        return len(sample) / (time.perf_counter() - started)

    return BudgetPlanner(deadline, final_images=n_valid + n_test,
                         n_valid=n_valid + every_epoch_images, time_final=time_final,
                         fixed_seconds=budget.EXIT_SECONDS + (
                             budget.FINAL_FIXED_SECONDS if cfg.report else 2.0),
                         budget_text=cfg.budget or "",
                         announce=cfg.progress and distributed.is_main())


def _budget_line(record: dict) -> str:
    plan = record.get("plan")
    line = (f"budget {record['budget']}: the run took "
            f"{budget.format_duration(record['used_seconds'])}")
    if plan:
        line += (f"; trained {plan['steps']} steps ({plan['steps'] / plan['steps_per_epoch']:.3g}"
                 f" epochs) at {plan['step_seconds'] * 1000:.3g} ms a step")
    if record.get("stopped_at_deadline"):
        line += "; stopped at the deadline before the planned end"
    return line


def lr_find(data: str | Path | Table, out: str | Path | None = "lr_find.png",
            config: FitConfig | None = None, **options: Any) -> LRFinderResult:
    """Run the LR finder on ``data`` with the model and options a fit would use, save its plot
    with the suggestions marked to ``out``, and return the sweep and its suggestions."""
    cfg: FitConfig = merge_options(FitConfig, config, options)
    if out is not None:
        out = runs.output_file(out, "--out")
    apply_pretrained_source(cfg)
    loaded = load_data(data, cfg)
    parts = build_training(cfg, loaded, resolve_device(cfg.device))
    result = make_learner(cfg, parts).lr_find(progress=cfg.progress)
    if out is not None:
        save_lr_finder_plot(result, Path(out))
    return result


def describe_targets(task: Task, targets: torch.Tensor) -> list[str]:
    """Short labels for a grid: a class, 'share class' pairs for mixed targets, the
    multi-label set, or the value(s)."""
    if task.kind == "regression":
        values = task.unscale(targets.float().reshape(len(targets), -1))
        return [", ".join(f"{v:.3g}" for v in row) for row in values.tolist()]
    if task.kind == "classification" and targets.ndim == 1:
        return [task.names[i] for i in targets.tolist()]
    labels = []
    for row in targets.float().tolist():
        ranked = sorted(zip(row, task.names), reverse=True)
        if task.kind == "multilabel":
            labels.append(";".join(f"{n}" if w >= 0.99 else f"{w:.2f} {n}"
                                   for w, n in ranked if w > 0.01) or "(none)")
        else:
            labels.append(" / ".join(f"{w:.2f} {n}" if w < 0.99 else n
                                     for w, n in ranked[:2] if w > 0.01))
    return labels


def show_batch(data: str | Path | Table, out: str | Path,
               options: ShowBatchOptions | None = None, **overrides: Any) -> Path:
    """Save a grid of augmented (and mixed) training images with their labels, as the model
    would see them before normalization; ``same_image`` augments one image many times."""
    cfg: ShowBatchOptions = merge_options(ShowBatchOptions, options, overrides)
    out = runs.output_file(out, "--out")
    loaded = load_data(data, cfg)
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
    title = f"{_run_source(data)}: augment {cfg.augment}" + (
        " (one image)" if cfg.same_image else "")
    return save_image_grid(batch, describe_targets(task, mixed), out, title=title)


def _summarize_data(run_dir: Path, loaded, parts, seed: int) -> None:
    norm = parts.model_info["normalization"]
    splits = {"train": loaded.train_rows, "valid": loaded.valid_rows, "test": loaded.test_rows}
    summary = summarize_dataset(loaded.table, loaded.prepared.cache, splits, norm["mean"],
                                norm["std"], run_dir / "plots", seed=seed)
    runs.save_json(run_dir / DATA_SUMMARY, summary)


def _write_report(run_dir: Path, learner: Learner, cfg: FitConfig) -> None:
    if not distributed.is_main():
        return
    if learner.history:
        save_metrics_plot(learner.history, run_dir / "plots" / "epochs.png")
    if cfg.report:
        write_report(run_dir)


def _run_source(data: str | Path | Table) -> str:
    return data.description if isinstance(data, Table) else str(data)


def _write_final_metrics(run_dir: Path, learner: Learner | None, summary: dict,
                         started: float, status: str, final_row: dict | None = None) -> dict:
    """metrics.json: the final (or last finished) epoch's validation figures, the summary
    and how the run ended: ``status`` done, interrupted or failed."""
    history = learner.history if learner is not None else []
    last = final_row or (history[-1] if history else {})
    train_seconds = learner.train_seconds if learner is not None else 0.0
    train_images = learner.train_images if learner is not None else 0
    metrics = {
        **{k: v for k, v in last.items() if k.startswith("valid_")},
        **summary,
        "status": status,
        "epochs": len(history),
        "interrupted": status == "interrupted",
        "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(train_images / max(train_seconds, 1e-9), 1),
    }
    if distributed.is_main():
        runs.save_json(run_dir / "metrics.json", metrics)
    return metrics


# -- using a trained model ----------------------------------------------------------------
