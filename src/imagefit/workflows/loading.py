"""A fit's data loaded: the source read, split, edited by the label issues, checked and
cached (images) or encoded (texts), with the augmentation resolved for it; and the checks a
fit makes of a whole table before a CV's folds share its cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..augment.color import pca_statistics
from ..augment.presets import resolve_augment
from ..config import (
    AugmentOptions,
    FitConfig,
    ImageOptions,
)
from ..data.cache import CacheSettings
from ..data.checks import check_has_training_rows, check_trainable, leak_notes
from ..data.inputs import ImageInput, Input, TextInput, table_input
from ..data.label_edits import apply_label_edits
from ..data.prepare import (
    PreparedImages,
    prepare_images,
    resolve_settings,
)
from ..data.sources import read_source
from ..data.splits import assign_validation
from ..data.table import Table
from ..data.text import PreparedText, prepare_texts
from ..devices import resolve_device
from ..errors import ImagefitError
from .preflight import check_image_room, check_text_room
from .recipes import (
    ASKED_TTA,
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
