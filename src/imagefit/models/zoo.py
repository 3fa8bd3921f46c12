"""The models imagefit accepts, and what they cost: ``model_names`` (its own nets and every
timm name, filtered), ``model_costs`` (parameters and multiply-adds at an image size) and
``summary_table`` (layer, output shape, parameters and multiply-adds per layer). Counting is
torchinfo's (``imagefit[zoo]``), not ours."""

from __future__ import annotations

import fnmatch
import math

import timm
import torch
from torch import nn

from ..data.resources import available_memory, format_bytes
from ..errors import ImagefitError
from . import MODELS, check_model_name, create_model
from .footprint import FALLBACK_BYTES_PER_INPUT
from .text import TEXT_MODELS

MISSING = ("model summaries need torchinfo: pip install 'imagefit[zoo]' (or pip install "
           "torchinfo)")


def _torchinfo():
    try:
        import torchinfo
    except ImportError:
        raise ImagefitError(MISSING) from None
    return torchinfo


def model_names(pattern: str | None = None) -> list[str]:
    """imagefit's own nets, then timm's models, whose names match ``pattern`` (shell-style
    wildcards, e.g. 'regnety_*'; a plain word matches names containing it, the name
    itself first)."""
    names = list(MODELS) + list(TEXT_MODELS) + timm.list_models()
    if not pattern:
        return names
    if any(c in pattern for c in "*?["):
        return [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    exact = [name for name in names if name == pattern]  # first, then those containing it
    return exact + [name for name in names if pattern in name and name != pattern]


def list_models(pattern: str | None = None, image_size: int = 224, channels: int = 3,
                costs: bool = True, limit: int = 50) -> list[dict]:
    """``model_names(pattern)`` as rows, the first ``limit`` with ``model_costs`` when
    ``costs`` (each model is built to be counted)."""
    return [_costs_or_why(name, image_size, channels) if costs and k < limit
            else {"model": name} for k, name in enumerate(model_names(pattern))]


def _costs_or_why(name: str, image_size: int, channels: int) -> dict:
    """``model_costs``, or the model's name and why it was not counted: a text model, or one
    that cannot run on an image of this size (a listing goes on past it)."""
    if name in TEXT_MODELS:
        return {"model": name, "note": "text model (--task text): its size depends on the "
                                       "vocabulary; imagefit summary RUN of a text fit"}
    try:
        return model_costs(name, image_size, channels)
    except RuntimeError:
        return {"model": name, "note": f"cannot run on a {image_size} px image"}
    except ImagefitError:  # counted on the CPU, and too large for its memory
        return {"model": name, "note": f"too large to count at {image_size} px here"}


def _statistics(model: nn.Module, channels: int, image_size: int, depth: int = 3,
                columns: tuple[str, ...] = ("output_size", "num_params", "mult_adds"),
                text_length: int | None = None):
    """torchinfo's statistics for one image, or one text of ``text_length`` characters."""
    torchinfo = _torchinfo()
    model.eval()
    device = next(model.parameters(), torch.zeros(0)).device
    if text_length is None and device.type != "meta":
        _require_memory(channels, image_size)
    shape = {"input_size": (1, channels, image_size, image_size)} if text_length is None \
        else {"input_data": torch.ones(1, text_length, dtype=torch.long, device=device)}
    with torch.no_grad():
        return torchinfo.summary(model, **shape, depth=depth, col_names=columns, verbose=0,
                                 device=device)


def _require_memory(channels: int, image_size: int) -> None:
    """Refuse an image size whose forward pass on a real device might not fit in memory,
    before it runs: counted at the largest bytes per input value measured of the nets'
    layer outputs (``models.footprint``). The meta device, where models are counted when
    they can be, needs none."""
    needed = FALLBACK_BYTES_PER_INPUT * channels * image_size * image_size
    available = available_memory()
    if needed <= available:
        return
    largest = math.isqrt(int(available / (FALLBACK_BYTES_PER_INPUT * channels)))
    raise ImagefitError(f"--image-size {image_size}: one image through the model would take "
                        f"up to {format_bytes(needed)} of memory (available: "
                        f"{format_bytes(available)}); the largest size that fits is {largest}")


def _counted(name: str, channels: int, n_out: int, image_size: int, depth: int,
             columns: tuple[str, ...]):
    """torchinfo's statistics of a model built on the meta device (shapes, no memory or
    arithmetic: regnety_320 is counted in 0.2 s instead of 1.8 s, to the same figures),
    or on the CPU where some operation has no meta version."""
    try:
        with torch.device("meta"):
            model = create_model(name, channels, n_out)
        return _statistics(model, channels, image_size, depth, columns)
    except (NotImplementedError, RuntimeError):
        return _statistics(create_model(name, channels, n_out), channels, image_size, depth,
                           columns)


def model_costs(name: str, image_size: int = 224, channels: int = 3,
                n_out: int = 1000) -> dict:
    """Parameters and multiply-adds of one forward pass of a single image of
    ``image_size``, for ``n_out`` outputs (ImageNet's 1,000 by default, as papers count)."""
    stats = _counted(name, channels, n_out, image_size, 0, ("num_params",))
    return {"model": name, "params": int(stats.total_params),
            "macs": int(stats.total_mult_adds)}


def summary_table(model: nn.Module, image_size: int, channels: int, depth: int = 3) -> str:
    """torchinfo's table of ``model``: layer, output shape, parameters, multiply-adds."""
    return str(_statistics(model, channels, image_size, depth))


def text_summary_table(model: nn.Module, length: int, depth: int = 3) -> str:
    """torchinfo's table of a text model reading one text of ``length`` characters."""
    return str(_statistics(model, 0, 0, depth, text_length=length))


def named_summary(name: str, image_size: int | None = None, channels: int | None = None,
                  depth: int = 3) -> str:
    """The table of a model by name, with ImageNet's 1,000 outputs (224 px, 3 channels
    unless given)."""
    if name in TEXT_MODELS:
        raise ImagefitError(f"{name} is a text model, whose size depends on the characters it "
                            "was trained on: summarize a text fit's run directory instead "
                            "(imagefit summary RUN)")
    check_model_name(name)
    return str(_counted(name, channels or 3, 1000, image_size or 224, depth,
                        ("output_size", "num_params", "mult_adds")))
