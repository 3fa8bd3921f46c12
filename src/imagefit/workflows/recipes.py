"""The recipes: values measured to work, filled into the options the user left unset. The
small-image recipe (32 px or less, imagefit's own nets from scratch), the photo default
(pretrained weights, augmentation for long fits), a named weights source's model and size,
and --recipe's fastai-style schedule (docs/RECIPES.md)."""

from __future__ import annotations

from .. import distributed
from ..config import FitConfig, ImageOptions, may_take_photo_weights, refuse_unused_options
from ..models import (
    PRETRAINED_SOURCES,
    SMALL_IMAGE_MAX,
    default_model_name,
    is_small_net,
    takes_small_image_optimizer,
)
from ..models.pretrained import default_photo_weights

# The small-image recipe (32 px or less, a small_cnn net from scratch), chosen by measurement
# on a validation split carved from Fashion-MNIST's training images: docs/RECIPES.md.
ASKED_TTA = {"tta", "tta_n", "tta_augment"}  # options that ask for test-time augmentation
SMALL_IMAGE_RECIPE = {"augment": "light", "label_smoothing": 0.1, "tta_augment": "flip"}
SMALL_IMAGE_OPTIMIZER = {"opt": "sgd", "lr": 0.1, "wd": 5e-4}  # Nesterov momentum
# Below this side a shift of 1/14 is under a pixel, a blur: builtin:digits (8 px) lost 5
# points of accuracy to the flips and shifts (0.936 vs 0.992, medians of 3 seeds), so such
# images train without augmentation, and without TTA.
MIN_AUGMENT_SIZE = 16
# Short fits learn faster without augmentation: on Fashion-MNIST's carved validation split,
# 5.4 epochs (--budget 1m) scored 0.9328 without it and 0.9245 with it (and flip TTA),
# 11.5 epochs (--budget 2m) 0.9310 without and 0.9374 with (bench/recipe_ablation.py); on a
# faster day, 9.2-10.6 epochs (--budget 1m) 0.9340 without and 0.9302 with (medians of 3
# seeds, bench/augment_by_length.py). A fit of fewer epochs than this trains without
# augmentation and TTA: an --epochs fit decides at once, a --budget fit at its first plan
# (``fit.augmentation_by_plan``).
AUGMENT_FROM_EPOCHS = 10


def choose_photo_weights(cfg: ImageOptions, image_size: int, say: bool = True) -> bool:
    """Photos (above 32 px) with neither --model nor --pretrained start from pretrained
    weights when they can be had without asking (``models.pretrained.default_photo_weights``:
    timm's cached or fetched, else an installed package, else from scratch), at the images'
    own size; ``--pretrained none`` trains from scratch. Says which in one line, and fills
    ``cfg.model`` and ``cfg.pretrained`` (config.yaml records them); ``say``: print the
    line (rank 0). True when it chose pretrained weights."""
    if not hasattr(cfg, "pretrained") or cfg.model != "auto" or cfg.pretrained is not None:
        return False
    if image_size <= SMALL_IMAGE_MAX:
        if may_take_photo_weights(cfg):  # none taken: what acts only with them is refused
            refuse_unused_options(cfg.model_copy(
                update={"model": default_model_name(image_size)}))
        return False
    if "pretrained" in cfg.model_fields_set:  # --pretrained none
        cfg.model = default_model_name(image_size)
        line = f"weights: none (--pretrained none), so {cfg.model} trains from scratch"
    else:  # every process looks for itself: the same files give the same answer
        chosen = default_photo_weights()
        cfg.model, cfg.pretrained, line = chosen.model, chosen.source, chosen.line
    if say and distributed.is_main():
        print(line)
    refuse_unused_options(cfg)  # told now: with or without weights
    return cfg.pretrained is not None


# Photos fine-tuned from the default weights overfit without augmentation once the fit is
# long: 2,000 Fashion-MNIST images at 64 px, --budget 5m (17-21 epochs), scored 0.8595
# without it and 0.8945 with --augment light (3 seeds of 3 better); at --budget 1m (3-4
# epochs) 0.820 without and 0.779 with (medians of 3 seeds, AMD EPYC, bench/photo_recipe.py).
# So, as the small-image recipe does, a fit of AUGMENT_FROM_EPOCHS epochs or more augments
# (light: flips and small shifts) and a shorter one does not; a --budget fit decides at its
# first plan.
PHOTO_AUGMENT = "light"


def apply_photo_augmentation(cfg: ImageOptions, chose_weights: bool) -> bool:
    """PHOTO_AUGMENT for a fit from the default photo weights (``chose_weights``) of at least
    AUGMENT_FROM_EPOCHS epochs, when --augment is unset. True when a --budget fit's first
    plan decides (``fit.augmentation_by_plan``): it trains with it until then."""
    if not chose_weights or "augment" in cfg.model_fields_set or not hasattr(cfg, "epochs"):
        return False
    if cfg.budget is None and cfg.epochs < AUGMENT_FROM_EPOCHS:
        return False
    cfg.augment = PHOTO_AUGMENT
    return cfg.budget is not None


def apply_small_image_recipe(cfg: ImageOptions, image_size: int,
                             single_label: bool = True) -> bool:
    """The small-image recipe's values for the options the user left unset, when single-label
    classification (what it was measured on) has small images and the net is one of
    imagefit's own (chosen automatically or named); its optimizer settings only when --opt
    is unset too, and the net takes them (``takes_small_image_optimizer``). True when it
    chose the augmentation and TTA of a --budget fit, which its first plan then decides."""
    model = getattr(cfg, "model", "auto")
    if image_size > SMALL_IMAGE_MAX or not single_label or getattr(
            cfg, "pretrained", None) or not (model == "auto" or is_small_net(model)):
        return False
    chosen = {"augment", "tta"} - cfg.model_fields_set
    defaults = dict(SMALL_IMAGE_RECIPE)
    short = hasattr(cfg, "epochs") and cfg.budget is None and cfg.epochs < AUGMENT_FROM_EPOCHS
    if image_size < MIN_AUGMENT_SIZE or short:
        defaults.update(augment="none", tta=False)
        del defaults["tta_augment"]
    if {"tta_n", "tta_augment"} & cfg.model_fields_set:  # asked for: TTA it is, as asked
        defaults.pop("tta", None)
        defaults.pop("tta_augment", None)
        chosen.discard("tta")
    if "opt" not in cfg.model_fields_set and takes_small_image_optimizer(model):
        defaults.update(SMALL_IMAGE_OPTIMIZER)
    for name, value in defaults.items():
        if name in type(cfg).model_fields and name not in cfg.model_fields_set:
            setattr(cfg, name, value)
    return chosen == {"augment", "tta"} and getattr(cfg, "budget", None) is not None and \
        cfg.augment != "none"


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


RECIPE_DEFAULTS = {"lr": "auto", "freeze_epochs": 2, "augment": "side_on", "cycle_len": 1,
                   "cycle_mult": 2}


def apply_recipe(cfg: FitConfig) -> None:
    """--recipe's defaults for what the user left unset (before the data is read)."""
    if not cfg.recipe:
        return
    for name, value in RECIPE_DEFAULTS.items():
        if name not in cfg.model_fields_set:
            setattr(cfg, name, value)
