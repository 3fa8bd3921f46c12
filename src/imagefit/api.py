"""The public functions: ``fit``, ``predict``, ``evaluate`` and ``load_model``.

Each builds source -> cache -> loader -> pipeline -> model -> learner and attaches the
callbacks that write the run directory.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from . import __version__, runs
from .augment.color import pca_statistics
from .augment.pipeline import BatchPipeline
from .augment.presets import resolve_augment
from .config import (
    AugmentOptions,
    EvaluateOptions,
    FitConfig,
    ImageOptions,
    PredictOptions,
    ShowBatchOptions,
    SourceOptions,
    make_options,
    merge_options,
)
from .data.cache import CacheSettings, build_cache, warn_unreadable
from .data.loader import Loader
from .data.prepare import PreparedImages, channel_stats, prepare_images, resolve_settings
from .data.sources import IMAGE_EXTENSIONS, Table, read_source
from .data.splits import assign_validation
from .errors import FitInterrupted, ImagefitError, ImagefitWarning
from .metrics import compute_metrics
from .models import (
    PRETRAINED_SOURCES,
    create_model,
    default_model_name,
    pretrained_statistics,
)
from .report.plots import save_image_grid, save_lr_finder_plot, save_training_plot
from .tasks import HIGHER_IS_BETTER, Task
from .train import schedules
from .train.callbacks import (
    BestCheckpoint,
    Callback,
    EarlyStopping,
    MixOff,
    ProgressCallback,
    ProgressiveResize,
    RunWriter,
    SnapshotSaver,
)
from .train.learner import Learner
from .train.lr_finder import LRFinderResult
from .train.precompute import fit_head_on_features, supports_precompute
from .train.schedules import Schedule

MIN_STEPS_PER_EPOCH = 32
MIN_BATCH_SIZE = 8


@dataclass
class FitResult:
    """What ``fit`` returns: the run directory, final metrics, per-epoch history, model."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict]
    model: nn.Module


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ImagefitError(f"option --device: unknown device '{name}'; use auto, cpu or cuda")\
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ImagefitError("option --device: CUDA is not available here; use --device cpu")
    return device


def training_batch_size(requested: int, n_train: int) -> int:
    """The requested batch size, lowered (to a power of two, at least 8) when the training
    set is too small for 32 steps per epoch: small datasets need more, smaller steps."""
    if n_train >= requested * MIN_STEPS_PER_EPOCH:
        return requested
    fitting = 2 ** int(np.log2(max(n_train // MIN_STEPS_PER_EPOCH, 1)))
    return max(min(requested, fitting, n_train), min(MIN_BATCH_SIZE, n_train))


def _run_name(data: str | Path | Table) -> str:
    if isinstance(data, Table):
        return data.description or "arrays"
    text = str(data)
    return text.removeprefix("builtin:") if text.startswith("builtin:") else Path(text).stem


@dataclass
class LoadedData:
    """A source read, split and cached, with its resolved augmentation."""

    table: Table
    settings: CacheSettings
    prepared: PreparedImages
    train_rows: np.ndarray
    valid_rows: np.ndarray
    test_rows: np.ndarray
    augment: AugmentOptions
    lighting: dict | None
    cache_seconds: float


def load_data(data: str | Path | Table, cfg: ImageOptions) -> LoadedData:
    """Read ``data``, carve the validation split, decode the images once into the cache and
    resolve the augmentation; fills ``cfg``'s automatic image size and channels."""
    table = data if isinstance(data, Table) else read_source(data, cfg)
    table = assign_validation(table, cfg.valid_pct, cfg.seed, cfg.stratify)
    if cfg.image_sizes and cfg.image_size is None:
        cfg.image_size = max(cfg.image_sizes)
    settings = resolve_settings(table, cfg.image_size, cfg.channels, cfg.resize, cfg.seed)
    started = time.perf_counter()
    prepared = prepare_images(table, settings, cache_dir=cfg.cache_dir, strict=cfg.strict,
                              progress=cfg.progress)
    cache_seconds = time.perf_counter() - started
    train_rows, valid_rows, test_rows = (prepared.rows(table, s)
                                         for s in ("train", "valid", "test"))
    if len(train_rows) == 0:
        raise ImagefitError(f"{table.description} has no readable training images")
    cfg.image_size, cfg.channels = settings.size, settings.channels
    augment = cfg.augment_options = resolve_augment(cfg.augment, cfg.augment_options)
    lighting = None
    if augment.lighting and settings.channels == 3:
        sample = np.random.default_rng(cfg.seed).choice(train_rows, min(len(train_rows), 500),
                                                        replace=False)
        lighting = pca_statistics(prepared.cache.images[np.sort(sample)], seed=cfg.seed)
    return LoadedData(table, settings, prepared, train_rows, valid_rows, test_rows, augment,
                      lighting, cache_seconds)


@dataclass
class TrainingParts:
    """What a learner is made of, built from loaded data and the fit options."""

    task: Task
    model: nn.Module
    pipeline: BatchPipeline
    batch_size: int
    loaders: dict[str, Loader | None]
    model_info: dict


def build_training(cfg: FitConfig, loaded: LoadedData, device: torch.device) -> TrainingParts:
    """Task, seeded model, normalization, pipeline and loaders for ``loaded``; fills the
    automatic choices (model) into ``cfg``."""
    table, settings = loaded.table, loaded.settings
    if cfg.model == "auto":
        cfg.model = default_model_name(settings.size)
    task = Task(table.task.kind, list(table.task.names), regression_loss=cfg.loss,
                label_smoothing=cfg.label_smoothing)
    task.fit_target_scaling(table.targets[loaded.train_rows])
    targets = task.encode_targets(table.targets)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, settings.channels, task.n_out, pretrained=cfg.pretrained,
                         dropout=cfg.dropout, drop_path=cfg.drop_path, head=cfg.head)
    mean, std = _normalization(cfg, model, loaded.prepared.cache.images, loaded.train_rows)
    model = model.to(device, memory_format=torch.channels_last)
    batch_size = training_batch_size(cfg.bs, len(loaded.train_rows))
    images = loaded.prepared.cache.tensor()

    def loader(rows: np.ndarray, train: bool = False) -> Loader | None:
        if len(rows) == 0:
            return None
        return Loader(images, targets, rows, batch_size if train else batch_size * 2,
                      shuffle=train, drop_last=train, seed=cfg.seed, device=device)

    pipeline = BatchPipeline(mean, std, loaded.augment, lighting=loaded.lighting,
                             n_classes=task.n_out if task.kind == "classification" else None)
    model_info = {
        "imagefit_version": __version__,
        "architecture": cfg.model,
        "head": cfg.head,
        "task": task.to_dict(),
        "image_size": cfg.image_sizes[-1] if cfg.image_sizes else settings.size,
        "channels": settings.channels,
        "resize": settings.resize,
        "normalization": {"mean": mean, "std": std},
        "lighting": loaded.lighting,
    }
    loaders = {"train": loader(loaded.train_rows, train=True),
               "valid": loader(loaded.valid_rows), "test": loader(loaded.test_rows)}
    return TrainingParts(task, model, pipeline, batch_size, loaders, model_info)


def apply_pretrained_source(cfg: FitConfig) -> None:
    """A named weights source decides the model, the image size and RGB input unless the
    user chose them."""
    source = PRETRAINED_SOURCES.get(cfg.pretrained or "")
    if source is None:
        return
    if cfg.model == "auto":
        cfg.model = source["architecture"]
    if cfg.image_size is None and not cfg.image_sizes:
        cfg.image_size = source["image_size"]
    if cfg.channels is None:
        cfg.channels = 3


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 on CUDA when supported (fp16 with a grad scaler otherwise) and on CPUs
    with AMX tiles; fp32 on other CPUs, where bf16 is slower."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_amx() else "fp32"


def _cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def make_learner(cfg: FitConfig, parts: TrainingParts, callbacks=(), **extra) -> Learner:
    device = next(parts.model.parameters()).device
    cfg.precision = resolve_precision(cfg.precision, device)
    return Learner(parts.model, parts.task, parts.loaders["train"], parts.loaders["valid"],
                   parts.pipeline, optimizer=cfg.opt, weight_decay=cfg.wd, seed=cfg.seed,
                   precision=cfg.precision, grad_clip=cfg.grad_clip,
                   accumulate=cfg.accumulate, ema_decay=cfg.ema, callbacks=callbacks, **extra)


def make_schedule(cfg: FitConfig) -> tuple[int, Schedule, Schedule | None]:
    """Epochs, learning rate and momentum schedules of the chosen ``cfg.schedule``."""
    lr = float(cfg.lr)
    if cfg.schedule == "one_cycle":
        return (cfg.epochs, schedules.one_cycle(lr, cfg.pct_start),
                schedules.one_cycle_momentum(pct_start=cfg.pct_start))
    if cfg.schedule == "sgdr":
        epochs = schedules.sgdr_cycle_ends(cfg.sgdr_cycles, cfg.cycle_len, cfg.cycle_mult)[-1]
        if "epochs" in cfg.model_fields_set and cfg.epochs != epochs:
            raise ImagefitError(
                f"--schedule sgdr with {cfg.sgdr_cycles} cycles (--cycle-len {cfg.cycle_len}, "
                f"--cycle-mult {cfg.cycle_mult}) lasts {epochs} epochs, not --epochs "
                f"{cfg.epochs}: leave out --epochs or change the cycles"
            )
        cfg.epochs = epochs
        return epochs, schedules.sgdr(lr, cfg.sgdr_cycles, cfg.cycle_len, cfg.cycle_mult), None
    plain = {"flat_cos": schedules.flat_cos, "warmup_cosine": schedules.warmup_cosine,
             "step": schedules.step_decay}[cfg.schedule]
    return cfg.epochs, plain(lr), None


def fit(data: str | Path | Table, config: FitConfig | None = None, *,
        callbacks: list[Callback] | tuple = (), **options: Any) -> FitResult:
    """Train a model on ``data`` (``builtin:NAME``, a folder, a CSV or a ``Table`` from
    ``from_arrays``) and write a run directory; ``options`` override ``config``'s fields and
    ``callbacks`` join the learner's own."""
    cfg: FitConfig = merge_options(FitConfig, config, options)
    apply_recipe(cfg)
    return _fit(data, cfg, callbacks)


RECIPE_DEFAULTS = {"lr": "auto", "freeze_epochs": 2, "augment": "side_on", "cycle_len": 1,
                   "cycle_mult": 2}


def apply_recipe(cfg: FitConfig) -> None:
    """--recipe's defaults for what the user left unset (before the data is read)."""
    if not cfg.recipe:
        return
    for name, value in RECIPE_DEFAULTS.items():
        if name not in cfg.model_fields_set:
            setattr(cfg, name, value)


def _train(learner: Learner, cfg: FitConfig, epochs: int, lr_schedule: Schedule,
           momentum: Schedule | None, summary: dict, resuming: bool) -> None:
    """The phases of a fit: head on precomputed features, frozen head, then everything
    (with discriminative rates), as one schedule or, with --recipe, SGDR cycles until the
    validation metric stops improving."""
    lr = float(cfg.lr)
    if cfg.recipe and learner.valid_loader is None:
        raise ImagefitError("--recipe stops when validation stops improving: give --valid-pct "
                            "above 0 or a validation split")
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
    if lr_low:
        learner.discriminative(lr_low, lr)
    if not cfg.recipe:
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
    directory: model, optimizer, schedule position, random state and metrics so far."""
    run_dir = Path(run)
    state = runs.load_checkpoint(run_dir)
    values = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = values.pop("data")
    described = values.pop("data_description", None)
    values.pop("batch_size_used", None)
    if data is None:
        raise ImagefitError(f"{run_dir} was trained on an in-memory table ({described}), "
                            "which cannot be read again: start a new fit")
    cfg = make_options(FitConfig, values)
    return _fit(data, cfg, callbacks, run_dir=run_dir, resume_state=state)


def _fit(data: str | Path | Table, cfg: FitConfig, callbacks=(), run_dir: Path | None = None,
         resume_state: dict | None = None) -> FitResult:
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    apply_pretrained_source(cfg)
    loaded = load_data(data, cfg)
    parts = build_training(cfg, loaded, device)
    finder = None
    if cfg.lr == "auto":
        finder = make_learner(cfg, parts).lr_find(progress=cfg.progress)
        cfg.lr = finder.suggestions["valley"]
        print(f"lr auto: {cfg.lr:.2e} (the LR finder's valley)")
    epochs, lr_schedule, momentum_schedule = make_schedule(cfg)
    if cfg.recipe and "precompute_epochs" not in cfg.model_fields_set:
        # the recipe's step 2, where the model has a separate body and classifier
        cfg.precompute_epochs = 2 if supports_precompute(parts.model) else 0

    if run_dir is None:
        run_dir = runs.new_run_dir(cfg.runs_dir, cfg.name or _run_name(data))
        source = None if isinstance(data, Table) else str(data)
        runs.save_yaml(run_dir / "config.yaml", {"data": source,
                                                 "data_description": _run_source(data),
                                                 **cfg.model_dump(),
                                                 "batch_size_used": parts.batch_size})
    if finder is not None:
        save_lr_finder_plot(finder, run_dir / "plots" / "lr_find.png")
    writer = RunWriter(run_dir, parts.model_info)
    own_callbacks = [ProgressCallback(cfg.progress, run_dir / "log.txt"), writer]
    if cfg.image_sizes:
        own_callbacks.append(ProgressiveResize(cfg.image_sizes))
    if loaded.augment.mix_off_epochs:
        own_callbacks.append(MixOff(loaded.augment.mix_off_epochs))
    if cfg.schedule == "sgdr" and cfg.snapshots:
        ends = schedules.sgdr_cycle_ends(cfg.sgdr_cycles, cfg.cycle_len, cfg.cycle_mult)
        own_callbacks.append(SnapshotSaver(run_dir, parts.model_info, ends))
    best = None
    if cfg.early_stop or cfg.keep_best:
        monitor, mode = _monitor(cfg, parts)
        if cfg.early_stop:
            own_callbacks.append(EarlyStopping(monitor, mode, cfg.early_stop, cfg.min_delta))
        if cfg.keep_best:
            best = BestCheckpoint(run_dir, parts.model_info, monitor, mode, restore=True)
            own_callbacks.append(best)
    test_loader = parts.loaders["test"]
    extra = {"test": test_loader} if cfg.test_every_epoch and test_loader else {}
    learner = make_learner(cfg, parts, [*own_callbacks, *callbacks], extra_loaders=extra)
    if resume_state is not None:
        learner.load_checkpoint_state(resume_state)
        writer.epochs_saved = len(learner.history)
        runs.write_metrics_rows(run_dir, learner.history)
        print(f"resuming {run_dir} after epoch {len(learner.history)}")
    table, prepared = loaded.table, loaded.prepared
    summary = {
        "data": _run_source(data),
        "task": parts.task.kind,
        "n_train": len(loaded.train_rows), "n_valid": len(loaded.valid_rows),
        "n_test": len(loaded.test_rows),
        "skipped_files": len(prepared.cache.errors),
        "skipped": [table.paths[r] for r in prepared.cache.failed] if table.paths else [],
        "cache_seconds": round(loaded.cache_seconds, 3),
    }
    try:
        _train(learner, cfg, epochs, lr_schedule, momentum_schedule, summary,
               resuming=resume_state is not None)
    except KeyboardInterrupt:
        del learner.history[writer.epochs_saved:]  # an epoch not on disk did not finish
        _write_final_metrics(run_dir, learner, summary, started, interrupted=True)
        raise FitInterrupted(run_dir, writer.epochs_saved) from None
    runs.save_steps(run_dir, learner.step_log)
    save_training_plot(learner.step_log, learner.history, run_dir / "plots" / "training.png")
    if learner.ema is not None:  # the model ends with the averaged weights it was judged on
        parts.model.load_state_dict(learner.ema.module.state_dict())
    final_row = learner.history[-1]
    if best is not None and best.best_epoch:  # the model now holds the best epoch's weights
        final_row = learner.history[best.best_epoch - 1]
        runs.save_model(run_dir, parts.model, {**parts.model_info,
                                               "epochs_trained": best.best_epoch})
        summary["best_epoch"] = best.best_epoch
    if test_loader is not None:
        summary.update(learner.evaluate(test_loader, prefix="test_"))
    metrics = _write_final_metrics(run_dir, learner, summary, started, interrupted=False,
                                   final_row=final_row)
    return FitResult(run_dir=run_dir, metrics=metrics, history=learner.history,
                     model=parts.model)


def _monitor(cfg: FitConfig, parts: TrainingParts) -> tuple[str, str]:
    """The epoch column to watch and whether lower ('min') or higher ('max') is better."""
    if parts.loaders["valid"] is None:
        raise ImagefitError("--early-stop and --keep-best watch the validation split: give "
                            "--valid-pct above 0 or a validation split")
    monitor = f"valid_{parts.task.main_metric}" if cfg.monitor == "auto" else cfg.monitor
    columns = [f"valid_{name}" for name in parts.task.metric_names]
    if monitor not in columns:
        raise ImagefitError(f"option --monitor: unknown column '{monitor}'; choose one of "
                            f"{', '.join(columns)}")
    return monitor, "max" if HIGHER_IS_BETTER[monitor.removeprefix("valid_")] else "min"


def lr_find(data: str | Path | Table, out: str | Path | None = "lr_find.png",
            config: FitConfig | None = None, **options: Any) -> LRFinderResult:
    """Run the LR finder on ``data`` with the model and options a fit would use, save its plot
    with the suggestions marked to ``out``, and return the sweep and its suggestions."""
    cfg: FitConfig = merge_options(FitConfig, config, options)
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


def _normalization(cfg: FitConfig, model: nn.Module, images: np.ndarray,
                   train_rows: np.ndarray) -> tuple[list, list]:
    """Input mean and std: the pretrained weights' own, or computed from training images."""
    if cfg.normalize == "auto":
        known = pretrained_statistics(model, cfg.channels, cfg.pretrained) is not None
        cfg.normalize = "pretrained" if known else "data"
    if cfg.normalize == "pretrained":
        stats = pretrained_statistics(model, cfg.channels, cfg.pretrained)
        if stats is None:
            raise ImagefitError(
                f"option --normalize pretrained: model {cfg.model} has no pretrained "
                "statistics; use --normalize data"
            )
        return stats
    return channel_stats(images, train_rows, cfg.seed)


def _run_source(data: str | Path | Table) -> str:
    return data.description if isinstance(data, Table) else str(data)


def _write_final_metrics(run_dir: Path, learner: Learner, summary: dict, started: float,
                         interrupted: bool, final_row: dict | None = None) -> dict:
    last = final_row or (learner.history[-1] if learner.history else {})
    metrics = {
        **{k: v for k, v in last.items() if k.startswith("valid_")},
        **summary,
        "epochs": len(learner.history),
        "interrupted": interrupted,
        "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(learner.train_seconds, 3),
        "images_per_second": round(learner.train_images / max(learner.train_seconds, 1e-9), 1),
    }
    runs.save_json(run_dir / "metrics.json", metrics)
    return metrics


# -- using a trained model ----------------------------------------------------------------


@dataclass
class LoadedModel:
    """A trained model with what it needs to see images as it saw them in training."""

    model: nn.Module
    task: Task
    settings: CacheSettings
    pipeline: BatchPipeline
    info: dict


def load_model(run: str | Path, device: str = "auto") -> LoadedModel:
    """The model of a run directory, from safetensors + JSON (no code is unpickled)."""
    info = runs.read_model_info(run)
    task = Task.from_dict(info["task"])
    model = create_model(info["architecture"], info["channels"], task.n_out,
                         head=info.get("head", "timm"))
    runs.load_weights(model, run)
    model = model.to(resolve_device(device), memory_format=torch.channels_last).eval()
    settings = CacheSettings(info["image_size"], info["channels"], info["resize"])
    norm = info["normalization"]
    return LoadedModel(model, task, settings, BatchPipeline(norm["mean"], norm["std"]), info)


@torch.no_grad()
def _outputs(loaded: LoadedModel, images: torch.Tensor, rows: np.ndarray,
             batch_size: int) -> torch.Tensor:
    device = next(loaded.model.parameters()).device
    dummy = torch.zeros(len(images))
    loader = Loader(images, dummy, rows, batch_size, device=device)
    if len(rows) == 0:
        return torch.zeros(0, loaded.task.n_out)
    return torch.cat([loaded.model(loaded.pipeline(x)).float().cpu() for x, _ in loader])


def _expand_inputs(inputs: list[str | Path], options: PredictOptions) -> list[str]:
    """Image files from files, folders (searched recursively) and CSV files of paths."""
    paths: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(str(p) for p in item.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImagefitError(f"folder {item} holds no image files")
            paths += found
        elif item.suffix.lower() == ".csv" and item.is_file():
            options_for_csv = SourceOptions(path_col=options.path_col, folder=options.folder,
                                            suffix=options.suffix)
            paths += _csv_paths(item, options_for_csv)
        elif item.is_file():
            paths.append(str(item))
        else:
            raise ImagefitError(f"input {item} not found: give image files, folders or a CSV")
    return paths


def _csv_paths(path: Path, options: SourceOptions) -> list[str]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    column = options.path_col or frame.columns[0]
    if column not in frame.columns:
        raise ImagefitError(
            f"{path.name} has no column '{column}' (its columns: {', '.join(frame.columns)}); "
            "choose one with --path-col"
        )
    folder = Path(options.folder) if options.folder else path.parent
    paths = [str(folder / (cell.strip() + options.suffix)) for cell in frame[column]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ImagefitError(
            f"{path.name}: {len(missing)} of {len(paths)} image paths do not exist (first: "
            f"{', '.join(missing[:3])}); check --folder and --suffix"
        )
    return paths


def predict(run: str | Path, inputs: list[str | Path], out: str | Path | None = None,
            options: PredictOptions | None = None, **overrides: Any) -> pd.DataFrame:
    """Predictions for image files, folders or CSVs of paths: a row per readable image with
    the path, the predicted label(s) or value(s) and the class probabilities."""
    options = merge_options(PredictOptions, options, overrides)
    loaded = load_model(run, options.device)
    paths = _expand_inputs(list(inputs), options)
    cache = build_cache(paths, loaded.settings, options.cache_dir, progress=options.progress)
    warn_unreadable(cache, paths)
    rows = np.setdiff1d(np.arange(len(paths)), cache.failed)
    activated = loaded.task.activate(_outputs(loaded, cache.tensor(), rows, options.bs))
    frame = pd.DataFrame({"path": [paths[r] for r in rows]})
    task = loaded.task
    if task.kind == "regression":
        for i, name in enumerate(task.names):
            frame[name] = activated[:, i].numpy()
    else:
        frame["labels" if task.kind == "multilabel" else "label"] = task.decode(activated)
        for i, name in enumerate(task.names):
            frame[f"prob_{name}"] = activated[:, i].numpy()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        runs.write_atomic(Path(out), frame.to_csv(index=False))
    return frame


def _align_targets(table: Table, task: Task) -> np.ndarray:
    """The table's targets in the order of the model's classes or targets."""
    names = table.task.names
    if table.task.kind != task.kind:
        raise ImagefitError(
            f"the data's targets are {table.task.kind} but the model was trained for "
            f"{task.kind}: pass --task {task.kind} or give matching data"
        )
    unknown = [n for n in names if n not in task.names]
    if task.kind == "regression":
        if len(names) != len(task.names):
            raise ImagefitError(
                f"the data has {len(names)} target(s), the model {len(task.names)} "
                f"({', '.join(task.names)}): choose them with --label-col"
            )
        return table.targets
    if unknown:
        raise ImagefitError(
            f"the data has classes the model was not trained on: {', '.join(unknown[:5])}"
        )
    position = np.array([task.names.index(n) for n in names])
    if task.kind == "classification":
        return position[table.targets]
    aligned = np.zeros((len(table), task.n_out), dtype=np.float32)
    aligned[:, position] = table.targets
    return aligned


def evaluate(run: str | Path, data: str | Path | Table, out: str | Path | None = None,
             options: EvaluateOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Loss and metrics of a run's model on a split of ``data``: the test split when there is
    one, else the validation split carved as the run carved it."""
    options = merge_options(EvaluateOptions, options, overrides)
    loaded = load_model(run, options.device)
    run_config = _read_run_config(Path(run))
    table = data if isinstance(data, Table) else read_source(data, options)
    split = options.split or ("test" if table.has_split("test") else "valid")
    if split == "valid":
        table = assign_validation(table, run_config.get("valid_pct", 0.2),
                                  run_config.get("seed", 0), run_config.get("stratify", True))
    prepared = prepare_images(table, loaded.settings, cache_dir=options.cache_dir,
                              strict=options.strict, progress=options.progress)
    rows = prepared.rows(table, split)
    if len(rows) == 0:
        raise ImagefitError(f"{table.description} has no {split} images: choose --split")
    targets = loaded.task.encode_targets(_align_targets(table, loaded.task))
    outputs = _outputs(loaded, prepared.cache.tensor(), rows, options.bs)
    results: dict[str, Any] = {"split": split, "n_images": len(rows),
                               "loss": loaded.task.loss(outputs, targets[rows]).item()}
    results.update(compute_metrics(loaded.task, outputs, targets[rows]))
    if out is not None:
        runs.save_json(Path(out), results)
    return results


def _read_run_config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        warnings.warn(f"{path} is missing: the validation split uses the default fraction "
                      "and seed", ImagefitWarning, stacklevel=3)
        return {}
    return yaml.safe_load(path.read_text()) or {}
