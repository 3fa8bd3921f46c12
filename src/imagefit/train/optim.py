"""Optimizers by name, over timm.optim: weight decay on weights only, never on norm layers'
parameters or biases."""

from __future__ import annotations

import difflib

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from torch import nn

from ..errors import ImagefitError

# Names practitioners use for the optimizers timm spells differently.
ALIASES = {"ranger": "lookahead_radam", "sgd_nesterov": "sgd", "nesterov": "sgd"}


def make_optimizer(model: nn.Module, name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters: 'adamw' (default), 'sgd' (Nesterov
    momentum 0.9), 'momentum', 'radam', 'ranger' (= lookahead_radam), 'lookahead_NAME', or any
    other name timm.optim knows."""
    opt = ALIASES.get(name.lower(), name.lower())
    base = opt.removeprefix("lookahead_")
    known = set(list_optimizers())
    if base not in known:
        close = difflib.get_close_matches(base, sorted(known | set(ALIASES)), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ImagefitError(f"unknown optimizer '{name}': {hint}see timm.optim.list_optimizers()")
    extra = {"betas": (0.9, 0.99), "eps": 1e-6} if base in ("adamw", "adam", "radam") else {}
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=True, **extra)
