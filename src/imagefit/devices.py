"""Devices and arithmetic: which device a name means, which precision ``auto`` means on it,
and the autocast context that runs a forward pass in that precision. Training, validation,
the final evaluation, predict and explain all go through ``autocast``, so the figures of one
model agree wherever they are computed."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from .errors import ImagefitError, ImagefitWarning


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 on CUDA when supported (fp16 with a grad scaler otherwise) and on CPUs
    with AMX tiles; fp32 on other CPUs, where bf16 is slower. fp16 on a CPU falls back to
    fp32, with a warning: CPUs have no fp16 arithmetic (16x slower than fp32 here)."""
    if device.type == "cpu" and precision == "fp16":
        warnings.warn("--precision fp16 on a CPU runs about 16x slower than fp32 (CPUs emulate "
                      "fp16 arithmetic): training in fp32 instead; fp16 is for CUDA GPUs",
                      ImagefitWarning, stacklevel=2)
        return "fp32"
    if device.type == "cpu" and precision == "bf16" and not cpu_has_amx():
        warnings.warn("--precision bf16 on a CPU without AMX runs slower than fp32 (0.92x for "
                      "ResNet-18 here); --precision auto chooses for you", ImagefitWarning,
                      stacklevel=2)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_amx() else "fp32"


def cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def inference_precision(requested: str, trained: str | None, device: torch.device) -> str:
    """The precision predict, evaluate and explain run a model in: the one asked for, or with
    'auto' the one it was trained and measured in (model.json) wherever this device has that
    arithmetic, so that its figures are the fit's to the last digit (bf16 on a CPU without AMX
    runs emulated and slower; ``--precision fp32`` trades that agreement for speed), else what
    'auto' means here."""
    if requested != "auto":
        return resolve_precision(requested, device)
    if trained in ("fp32", "bf16") or (trained == "fp16" and device.type == "cuda"):
        return trained
    return resolve_precision("auto", device)


def autocast(precision: str, device: torch.device):
    """The context a forward pass runs in for ``precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
