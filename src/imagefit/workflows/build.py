"""Assembling a fit from options: data read and cached, task, model, normalization,
pipeline, loaders, learner and schedule. ``api`` calls these; users call ``api``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed, models
from ..augment.color import pca_statistics
from ..augment.pipeline import BatchPipeline
from ..augment.presets import resolve_augment
from ..augment.text import TextPipeline
from ..config import (
    AugmentOptions,
    FitConfig,
    ImageOptions,
)
from ..data.cache import CacheSettings
from ..data.checks import check_has_training_rows, check_trainable, leak_notes
from ..data.inputs import ImageInput, Input, TextInput, table_input
from ..data.label_edits import apply_label_edits
from ..data.loader import Loader, on_device_if_it_fits
from ..data.prepare import (
    STATS_MAX_IMAGES,
    PreparedImages,
    channel_stats,
    measure_channels,
    prepare_images,
    resolve_settings,
)
from ..data.sampling import class_weights, resample_rows, weighted_sampler_rows
from ..data.sources import read_source
from ..data.splits import assign_validation
from ..data.table import Table
from ..data.text import PreparedText, prepare_texts
from ..devices import resolve_device, resolve_precision
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
from .preflight import check_image_room, check_text_room
from .recipes import (
    ASKED_TTA,
    MIN_AUGMENT_SIZE,
    apply_photo_augmentation,
    apply_pretrained_source,
    apply_small_image_recipe,
    choose_photo_weights,
)

MIN_STEPS_PER_EPOCH = 32


MIN_BATCH_SIZE = 8
AUTO_BATCH_START = 1024  # --bs auto tries this first, then halves


def training_batch_size(requested: int, n_train: int) -> int:
    """The requested batch size, lowered (to a power of two, at least 8) when the training
    set is too small for 32 steps per epoch: small datasets need more, smaller steps."""
    if n_train >= requested * MIN_STEPS_PER_EPOCH:
        return requested
    fitting = 2 ** int(np.log2(max(n_train // MIN_STEPS_PER_EPOCH, 1)))
    return max(min(requested, fitting, n_train), min(MIN_BATCH_SIZE, n_train))


@dataclass
class LoadedData:
    """A source read, split and cached, with its resolved augmentation."""

    table: Table
    settings: CacheSettings | None  # None for texts
    prepared: PreparedImages | PreparedText
    train_rows: np.ndarray
    valid_rows: np.ndarray
    test_rows: np.ndarray
    augment: AugmentOptions
    lighting: dict | None
    cache_seconds: float
    notes: dict = field(default_factory=dict)  # for metrics.json: copies across splits
    # sharded data (distributed.sharded_data): split -> every rank's own usable rows
    shares: dict[str, list[np.ndarray]] | None = None
    places: torch.Tensor | None = None  # where this rank's cache holds each row (a shard)
    # the small-image recipe's augmentation, left to a --budget fit's first plan
    augment_until_plan: bool = False
    tta_asked: bool = False  # the user asked for test-time augmentation: a budget keeps it

    @property
    def input(self) -> Input:
        """What the model will read: the images' settings, or the texts' characters and
        length."""
        if self.settings is not None:
            return ImageInput(self.settings)
        return TextInput(self.prepared.vocabulary, self.prepared.length)

    def own_rows(self, split: str) -> tuple[np.ndarray, dict]:
        """The rows of ``split`` this rank reads, and the Loader arguments that share them."""
        rows = {"train": self.train_rows, "valid": self.valid_rows, "test": self.test_rows}
        if self.shares is None:
            return rows[split], distributed.shard()
        return self.shares[split][distributed.rank()], {
            **distributed.shard(), "counts": [len(share) for share in self.shares[split]],
            "places": self.places}


def load_data(data: str | Path | Table, cfg: ImageOptions) -> LoadedData:
    """Read ``data``, carve the validation split, decode the images once into the cache and
    resolve the augmentation; fills ``cfg``'s automatic image size and channels."""
    table = data if isinstance(data, Table) else read_source(data, cfg)
    check_has_training_rows(table)
    table = assign_validation(table, cfg.valid_pct, cfg.seed, cfg.stratify)
    table, edits = apply_label_edits(table, getattr(cfg, "drop_rows", None),
                                     getattr(cfg, "relabel", None), getattr(cfg, "top", None),
                                     getattr(cfg, "min_score", None))
    if edits and distributed.is_main():
        print(_describe_edits(edits))
    if not table_input(table).reads_images:
        return _load_texts(table, cfg, edits)
    if cfg.image_sizes and cfg.image_size is None:
        cfg.image_size = max(cfg.image_sizes)
    settings = resolve_settings(table, cfg.image_size, cfg.channels, cfg.resize, cfg.seed)
    tta_asked = bool(ASKED_TTA & cfg.model_fields_set)  # before a recipe sets any of them
    chose_weights = choose_photo_weights(cfg, settings.size)
    augment_until_plan = apply_small_image_recipe(cfg, settings.size, table.task.single_label) or \
        apply_photo_augmentation(cfg, chose_weights)
    started = time.perf_counter()
    shares = _data_shares(table, cfg.seed) if distributed.sharded_data() and \
        table.arrays is None else None
    held = None if shares is None else np.concatenate(
        [split[distributed.rank()] for split in shares.values()])
    check_image_room(table, settings, cfg, *preflight_batch(table, cfg), rows=held)
    prepared = prepare_images(table, settings, cache_dir=cfg.cache_dir, strict=cfg.strict,
                              progress=cfg.progress, rows=held)
    cache_seconds = time.perf_counter() - started
    train_rows, valid_rows, test_rows = (prepared.rows(table, s)
                                         for s in ("train", "valid", "test"))
    if shares is not None:  # each rank's own rows, those that could be read
        shares = {name: [share[prepared.usable[share]] for share in split]
                  for name, split in shares.items()}
    check_trainable(table, prepared.cache, train_rows)
    notes = leak_notes(table, prepared.cache,
                       {"train": train_rows, "valid": valid_rows, "test": test_rows})
    cfg.image_size, cfg.channels = settings.size, settings.channels
    augment = cfg.augment_options = resolve_augment(cfg.augment, cfg.augment_options)
    lighting = None
    if augment.lighting and settings.channels == 3:
        sample = np.random.default_rng(cfg.seed).choice(train_rows, min(len(train_rows), 500),
                                                        replace=False)
        lighting = pca_statistics(prepared.cache.read(np.sort(sample)), seed=cfg.seed)
    if edits:
        notes["label_edits"] = edits
    return LoadedData(table, settings, prepared, train_rows, valid_rows, test_rows, augment,
                      lighting, cache_seconds, notes, shares, prepared.cache.places(),
                      augment_until_plan, tta_asked)


def _data_shares(table: Table, seed: int) -> dict[str, list[np.ndarray]]:
    """Every rank's share of each split's rows (sharded data), before unreadable files are
    known: the rows each rank decodes."""
    ranks = distributed.world_size()
    return {"train": distributed.training_shares(np.flatnonzero(table.split == "train"), seed,
                                                 ranks),
            **{name: distributed.evaluation_shares(np.flatnonzero(table.split == name), ranks)
               for name in ("valid", "test")}}


def _load_texts(table: Table, cfg: ImageOptions, edits: dict | None) -> LoadedData:
    """A text table encoded with its training split's characters: no images, so no
    augmentation, test-time augmentation or channels-last batches."""
    if cfg.text_length:
        check_text_room(table, cfg.text_length, *preflight_batch(table, cfg, text=True))
    texts = prepare_texts(table, length=cfg.text_length, percentile=cfg.text_percentile,
                          lowercase=not cfg.keep_case)
    rows = [texts.rows(table, s) for s in ("train", "valid", "test")]
    check_trainable(table, texts.cache, rows[0])
    cfg.text_length = texts.length
    cfg.augment, cfg.augment_options = "none", AugmentOptions()
    for name, value in {"tta": False, "channels_last": False, "image_size": None}.items():
        if name in type(cfg).model_fields:
            setattr(cfg, name, value)
    notes = {"text": {"length": texts.length, "percentile": texts.percentile,
                      "vocabulary_size": len(texts.vocabulary.characters)}}
    if edits:
        notes["label_edits"] = edits
    return LoadedData(table, None, texts, *rows, cfg.augment_options, None,
                      texts.cache.built_seconds, notes)


def require_images(loaded: LoadedData, command: str) -> None:
    """Refuse texts in a command that only knows images, in one line."""
    if not table_input(loaded.table).reads_images:
        raise ImagefitError(f"{command} works on images, and {loaded.table.description} holds "
                            "texts: fit, cv, predict and evaluate read texts")


def _describe_edits(edits: dict) -> str:
    done = (f"dropped {edits['dropped']} training row(s)" if edits["action"] == "drop" else
            f"relabelled {edits['relabelled']} training row(s)"
            + (f" ({edits['unchanged']} already had the suggested label)"
               if edits["unchanged"] else ""))
    kept = (f"; {edits['not_training']} listed row(s) are validation or test rows: kept as "
            "they are" if edits["not_training"] else "")
    return f"label issues: {done} of the {edits['listed']} chosen in {edits['file']}{kept}"


def check_data(table: Table, cfg: FitConfig) -> int | None:
    """The checks a fit makes of its data, on a whole table at once (cross-validation, before
    its directory exists): training rows, readable images, classes, targets. The image cache
    built here is the one the folds then read. Returns the image size (None for texts)."""
    check_has_training_rows(table)
    if not table_input(table).reads_images:
        if cfg.text_length:
            check_text_room(table, cfg.text_length, *preflight_batch(table, cfg, text=True))
        texts = prepare_texts(table, length=cfg.text_length, percentile=cfg.text_percentile,
                              lowercase=not cfg.keep_case)
        check_trainable(table, texts.cache, np.flatnonzero(table.split != "test"))
        return None
    cfg = cfg.model_copy()
    apply_pretrained_source(cfg)
    settings = resolve_settings(table, cfg.image_size or (max(cfg.image_sizes) if
                                                          cfg.image_sizes else None),
                                cfg.channels, cfg.resize, cfg.seed)
    check_image_room(table, settings, cfg, *preflight_batch(table, cfg))
    prepared = prepare_images(table, settings, cache_dir=cfg.cache_dir, strict=cfg.strict,
                              progress=cfg.progress)
    check_trainable(table, prepared.cache, np.flatnonzero(prepared.usable &
                                                          (table.split != "test")))
    return settings.size


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


def preflight_batch(table: Table, cfg: ImageOptions, text: bool = False
                    ) -> tuple[int | None, torch.device | None]:
    """The batch one process trains on and its device, as the fit will choose them, for the
    preflight (``check_image_room``); show-batch's grid, which no model sees, on the CPU.
    --bs auto counts as one image on a GPU (its search halves down to that), as the default
    elsewhere and for texts (``choose_batch_size``, ``_text_training``)."""
    if not hasattr(cfg, "bs"):
        return getattr(cfg, "n_images", None), None
    device = resolve_device(cfg.device)
    requested = cfg.bs
    if requested == "auto":
        on_gpu = device.type == "cuda" and not text
        requested = 1 if on_gpu else FitConfig.model_fields["bs"].default
    batch = training_batch_size(requested, int(np.sum(table.split == "train")))
    return max(1, -(-batch // distributed.world_size())), device


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
