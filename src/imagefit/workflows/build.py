"""Assembling a fit from options: data read and cached, task, model, normalization,
pipeline, loaders, learner and schedule. ``api`` calls these; users call ``api``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import distributed, models
from ..augment.pipeline import BatchPipeline
from ..augment.text import TextPipeline
from ..config import (
    FitConfig,
)
from ..data.loader import Loader, on_device_if_it_fits
from ..data.prepare import (
    STATS_MAX_IMAGES,
    channel_stats,
    measure_channels,
)
from ..data.sampling import class_weights, resample_rows, weighted_sampler_rows
from ..data.table import Table
from ..data.text import PreparedText
from ..devices import resolve_precision
from ..errors import ImagefitError
from ..metrics import available_metrics
from ..models import (
    NARROW_NET,
    create_model,
    default_model_name,
    pretrained_statistics,
)
from ..models.heads import resolve_head
from ..models.pretrained import weights_record
from ..models.text import TEXT_MODEL, create_text_model
from ..tasks import HIGHER_IS_BETTER, Regression, Task, resolve_loss, task_class
from ..train import schedules
from ..train.learner import Learner
from ..train.memory import largest_batch_size
from ..train.schedules import Schedule
from ..train.step import net_for_budget
from ..version import __version__
from .loading import (
    AUTO_BATCH_START,
    LoadedData,
    training_batch_size,
)
from .recipes import (
    MIN_AUGMENT_SIZE,
)


@dataclass
class TrainingParts:
    """What a learner is made of, built from loaded data and the fit options."""

    task: Task
    model: nn.Module
    pipeline: BatchPipeline
    batch_size: int
    loaders: dict[str, Loader | None]
    model_info: dict
    n_train_sampled: int | None = None  # training loader rows, when resampling changed them
    lr_factor: float = 1.0  # on the learning rates, for --bs auto's batch size




def build_training(cfg: FitConfig, loaded: LoadedData, device: torch.device,
                   budget_seconds: float | None = None) -> TrainingParts:
    """Task, seeded model, normalization, pipeline and loaders for ``loaded``; fills the
    automatic choices (model) into ``cfg``. ``budget_seconds``: what is left of a --budget,
    which may choose a wider small net (``train.step.net_for_budget``)."""
    table, settings = loaded.table, loaded.settings
    if cfg.model == "auto":
        cfg.model = default_model_name(settings.size, table.task.single_label) if \
            loaded.input.reads_images else TEXT_MODEL
        if budget_seconds is not None and cfg.model == NARROW_NET and \
                settings.size >= MIN_AUGMENT_SIZE:  # what the recipe was measured on
            _widen_for_budget(cfg, loaded, device, budget_seconds)
    try:
        cfg.loss = resolve_loss(table.task.kind, cfg.loss)
    except ValueError as error:
        raise ImagefitError(f"option --loss: {error}") from None
    task = Task(table.task.kind, list(table.task.names),
                regression_loss=cfg.loss if cfg.loss in Regression.losses else "mse",
                label_smoothing=cfg.label_smoothing,
                metrics=epoch_metrics(table.task.kind, cfg.metrics))
    task.fit_target_scaling(table.targets[loaded.train_rows])
    train_rows, sampler = _training_rows(cfg, table, loaded.train_rows)
    if cfg.class_weights:
        task.class_weights = class_weights(table.targets[train_rows], task).tolist()
    targets = task.encode_targets(table.targets)
    torch.manual_seed(cfg.seed)
    if not loaded.input.reads_images:
        return _text_training(cfg, loaded, task, targets, train_rows, sampler, device)
    model = create_model(cfg.model, settings.channels, task.n_out, pretrained=cfg.pretrained,
                         dropout=cfg.dropout, drop_path=cfg.drop_path, head=cfg.head,
                         head_hidden=cfg.head_hidden, act=cfg.act)
    head_hidden, dropout = resolve_head(cfg.head, cfg.head_hidden, cfg.dropout)
    mean, std = _normalization(cfg, model, loaded)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN times its kernels once
    batch_size, lr_factor = choose_batch_size(cfg, model, (settings.channels, settings.size,
                                                           settings.size), len(train_rows))
    pipeline = BatchPipeline(mean, std, loaded.augment, lighting=loaded.lighting,
                             n_classes=task.n_out if task.single_label else None)
    model_info = {
        "imagefit_version": __version__,
        "architecture": cfg.model,
        "head": cfg.head,
        "head_hidden": head_hidden,  # as built: what load_model rebuilds
        "dropout": dropout,
        "act": cfg.act,
        "task": task.to_dict(),
        "image_size": cfg.image_sizes[-1] if cfg.image_sizes else settings.size,
        "channels": settings.channels,
        "resize": settings.resize,
        "normalization": {"mean": mean, "std": std},
        "pretrained": weights_record(model, cfg.pretrained),
        "lighting": loaded.lighting,
        "precision": resolve_precision(cfg.precision, device),  # predict and evaluate's too
    }
    loaders = _loaders(cfg, loaded, targets, train_rows, batch_size, sampler, device)
    n_train_sampled = sampled_count(loaders["train"], train_rows, loaded)
    return TrainingParts(task, model, pipeline, batch_size, loaders, model_info, n_train_sampled,
                         lr_factor)


def _widen_for_budget(cfg: FitConfig, loaded: LoadedData, device: torch.device,
                      seconds: float) -> None:
    """The small-image recipe's net for a --budget fit: small_cnn_32 when the budget holds
    enough epochs of it (timed and chosen by rank 0, for every rank)."""
    settings = loaded.settings
    chosen = net_for_budget(cfg.model, seconds, len(loaded.train_rows),
                            (settings.channels, settings.size, settings.size),
                            len(loaded.table.task.names), device,
                            world_size=distributed.world_size(),
                            precision=cfg.precision) if distributed.is_main() else None
    name, epochs = distributed.from_main(chosen)  # cfg.precision: resolved by prepare
    wider_from = models.WIDER_FROM_EPOCHS
    loaded.notes["net_by_budget"] = {"chosen": name, "estimated_epochs": round(epochs, 2),
                                     "wider_from_epochs": wider_from}
    if name != cfg.model and distributed.is_main():
        print(f"model auto: {name}, as the budget holds about {epochs:.0f} epochs of it "
              f"({wider_from} or more train the wider net: docs/RECIPES.md)", flush=True)
    cfg.model = name


def sampled_count(train: Loader | None, train_rows: np.ndarray, loaded: LoadedData
                  ) -> int | None:
    """Training rows an epoch draws, where resampling made them differ from the split's."""
    total = sum(train.counts) if train is not None and train.counts is not None \
        else len(train_rows)
    return total if total != len(loaded.train_rows) else None


def _loaders(cfg: FitConfig, loaded: LoadedData, targets: torch.Tensor, train_rows: np.ndarray,
             batch_size: int, sampler, device: torch.device) -> dict[str, Loader | None]:
    """Training (shuffled, resampled), validation and test loaders over the cached images or
    encoded texts, held on a GPU when they fit (``on_device_if_it_fits``); evaluation batches
    are twice as large (no gradients to keep)."""
    items = on_device_if_it_fits(loaded.prepared.cache.tensor(), device)

    def loader(rows: np.ndarray, train: bool = False, **shard) -> Loader | None:
        if len(rows) == 0 and "counts" not in shard:  # a share may be empty, not all
            return None
        return Loader(items, targets, rows, batch_size if train else batch_size * 2,
                      shuffle=train, drop_last=train, seed=cfg.seed, device=device,
                      sampler=sampler if train else None, **(shard or distributed.shard()))

    if loaded.shares is None:
        return {"train": loader(train_rows, train=True), "valid": loader(loaded.valid_rows),
                "test": loader(loaded.test_rows)}
    # sharded: each rank resamples (--oversample, --balance, --weighted-sampler) its own share
    table = loaded.table
    per_rank = [_training_rows(cfg, table, share) for share in loaded.shares["train"]]
    own, sampler = per_rank[distributed.rank()]
    result = {"train": loader(own, train=True, **distributed.shard(), places=loaded.places,
                              counts=[len(rows) for rows, _ in per_rank])}
    for name in ("valid", "test"):
        rows, shard = loaded.own_rows(name)
        result[name] = loader(rows, **shard) if sum(shard["counts"]) else None
    return result


def _text_training(cfg: FitConfig, loaded: LoadedData, task: Task, targets: torch.Tensor,
                   train_rows: np.ndarray, sampler, device: torch.device) -> TrainingParts:
    """The parts of a text fit: a character model over the encoded texts, batches as they
    are (no normalization or augmentation)."""
    if cfg.pretrained:
        raise ImagefitError("--pretrained: text models train from scratch; leave it out")
    texts: PreparedText = loaded.prepared
    model = create_text_model(cfg.model, len(texts.vocabulary), task.n_out,
                              dropout=cfg.dropout).to(device)
    batch_size, lr_factor = training_batch_size(
        cfg.bs if cfg.bs != "auto" else FitConfig.model_fields["bs"].default,
        len(train_rows)), 1.0
    model_info = {
        "imagefit_version": __version__,
        "input": "text",
        "architecture": cfg.model,
        "task": task.to_dict(),
        "text": texts.settings(),
        "dropout": cfg.dropout,
        "precision": resolve_precision(cfg.precision, device),
    }
    loaders = _loaders(cfg, loaded, targets, train_rows, batch_size, sampler, device)
    n_train_sampled = sampled_count(loaders["train"], train_rows, loaded)
    return TrainingParts(task, model, TextPipeline(), batch_size, loaders, model_info,
                         n_train_sampled, lr_factor)


def choose_batch_size(cfg: FitConfig, model: nn.Module, input_shape: tuple[int, int, int],
                      n_train: int) -> tuple[int, float]:
    """The training batch size and the factor on the learning rates that goes with it.
    --bs auto on a CUDA GPU: the largest power of two (at most 1024, and no more than small
    training sets allow) whose training step fits in its memory, the learning rates scaled by
    it over the batch the default would give (unless --lr auto measures them at it)."""
    if cfg.bs != "auto":
        return training_batch_size(cfg.bs, n_train), 1.0
    default = training_batch_size(FitConfig.model_fields["bs"].default, n_train)
    device = next(model.parameters()).device
    if device.type != "cuda":
        print(f"bs auto: {default}, the default (the largest batch that fits is searched for on "
              "CUDA GPUs only)")
        return default, 1.0
    if distributed.world_size() > 1:  # the ranks' searches could disagree
        raise ImagefitError("--bs auto searches one GPU's memory: give --bs (the global "
                            "batch) when training on several devices")
    size = largest_batch_size(
        model, input_shape, training_batch_size(AUTO_BATCH_START, n_train), optimizer=cfg.opt,
        precision=resolve_precision(cfg.precision, device),
        memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    factor = 1.0 if cfg.lr == "auto" else size / default
    print(f"bs auto: {size}, the largest power of two whose training step fits in GPU memory; "
          f"learning rate x{factor:g}")
    return size, factor


def _training_rows(cfg: FitConfig, table: Table, train_rows: np.ndarray
                   ) -> tuple[np.ndarray, Callable[[int], np.ndarray] | None]:
    """The training loader's rows after --oversample or --balance, and --weighted-sampler's
    per-epoch draw. Validation and test rows keep the data's proportions."""
    rows = resample_rows(train_rows, table.targets, table.task,
                         oversample=cfg.oversample, balance=cfg.balance, seed=cfg.seed)
    if not cfg.weighted_sampler:
        return rows, None

    def draw(epoch: int) -> np.ndarray:
        return weighted_sampler_rows(rows, table.targets, table.task, seed=cfg.seed,
                                     epoch=epoch)

    draw(0)  # a task without classes fails here, before anything is trained
    return rows, draw


def make_learner(cfg: FitConfig, parts: TrainingParts, callbacks=(), **extra) -> Learner:
    device = next(parts.model.parameters()).device
    return Learner(parts.model, parts.task, parts.loaders["train"], parts.loaders["valid"],
                   parts.pipeline, optimizer=cfg.opt, weight_decay=cfg.wd, seed=cfg.seed,
                   precision=resolve_precision(cfg.precision, device), grad_clip=cfg.grad_clip,
                   accumulate=cfg.accumulate, ema_decay=cfg.ema, compile=cfg.compile,
                   channels_last=cfg.channels_last, lr_factor=parts.lr_factor,
                   callbacks=callbacks, **extra)


def make_schedule(cfg: FitConfig, planned: bool = False
                  ) -> tuple[int, Schedule, Schedule | None]:
    """Epochs, learning rate and momentum schedules of the chosen ``cfg.schedule``;
    ``planned``: a --budget fit, whose length the planner sets (SGDR's cycles then share it
    in their proportions)."""
    lr = float(cfg.lr)
    if cfg.schedule == "one_cycle":
        return (cfg.epochs, schedules.one_cycle(lr, cfg.pct_start),
                schedules.one_cycle_momentum(pct_start=cfg.pct_start))
    if cfg.schedule == "sgdr":
        epochs = schedules.sgdr_cycle_ends(cfg.sgdr_cycles, cfg.cycle_len, cfg.cycle_mult)[-1]
        if "epochs" in cfg.model_fields_set and cfg.epochs != epochs and not planned:
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


def epoch_metrics(kind: str, chosen: list[str] | None) -> list[str]:
    """The metrics to show per epoch: the chosen ones (checked), the main metric first."""
    if not chosen:
        return []
    known = available_metrics(task_class(kind))
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ImagefitError(f"option --metrics: unknown {kind} metric '{unknown[0]}'; choose "
                            f"from {', '.join(known)}")
    main = task_class(kind).main_metric
    return [main, *dict.fromkeys(name for name in chosen if name != main)]


def monitor_column(cfg: FitConfig, parts: TrainingParts) -> tuple[str, str]:
    """The epoch column to watch and whether lower ('min') or higher ('max') is better."""
    if parts.loaders["valid"] is None:
        raise ImagefitError("--early-stop, --keep-best and --plateau watch the validation "
                            "split: give --valid-pct above 0 or a validation split")
    monitor = f"valid_{parts.task.main_metric}" if cfg.monitor == "auto" else cfg.monitor
    columns = [f"valid_{name}" for name in parts.task.metric_names]
    if monitor not in columns:
        raise ImagefitError(f"option --monitor: unknown column '{monitor}'; choose one of "
                            f"{', '.join(columns)}")
    if cfg.monitor_mode != "auto":
        return monitor, cfg.monitor_mode
    return monitor, "max" if HIGHER_IS_BETTER[monitor.removeprefix("valid_")] else "min"


def _normalization(cfg: FitConfig, model: nn.Module, loaded: LoadedData) -> tuple[list, list]:
    """Input mean and std: the pretrained weights' own, or computed from training images
    (sharded data: from each rank's own, put together)."""
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
    images = loaded.prepared.cache.images
    if loaded.shares is None:
        return channel_stats(images, loaded.train_rows, cfg.seed)
    own, _ = loaded.own_rows("train")
    most = STATS_MAX_IMAGES // distributed.world_size()
    mean, std = (np.asarray(v) for v in measure_channels(
        images, loaded.prepared.cache.local(own), cfg.seed, most))
    weight = float(min(len(own), most))
    sums = distributed.sum_over_ranks(torch.tensor(
        [weight, *(weight * mean), *(weight * (std ** 2 + mean ** 2))], dtype=torch.float64))
    count, channels = max(float(sums[0]), 1.0), len(mean)
    mean = sums[1:1 + channels].numpy() / count
    std = np.sqrt(np.maximum(sums[1 + channels:].numpy() / count - mean ** 2, 0.0))
    return mean.tolist(), np.where(std > 0, std, 1.0).tolist()
