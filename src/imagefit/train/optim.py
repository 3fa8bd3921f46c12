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


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   groups: list[list[nn.Parameter]] | None = None,
                   lr_scales: list[float] | None = None) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s parameters: 'adamw' (default), 'sgd' (Nesterov
    momentum 0.9), 'momentum', 'radam', 'ranger' (= lookahead_radam), 'lookahead_NAME', or any
    other name timm.optim knows.

    With ``groups`` and ``lr_scales`` (one per group), each group's learning rate is the
    schedule's times its scale (``lr_scale`` in the param group): discriminative rates."""
    opt = ALIASES.get(name.lower(), name.lower())
    base = opt.removeprefix("lookahead_")
    known = set(list_optimizers())
    if base not in known:
        close = difflib.get_close_matches(base, sorted(known | set(ALIASES)), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ImagefitError(f"unknown optimizer '{name}': {hint}see timm.optim.list_optimizers()")
    extra = {"betas": (0.9, 0.99), "eps": 1e-6} if base in ("adamw", "adam", "radam") else {}
    if groups is None:
        return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay,
                                   filter_bias_and_bn=True, **extra)
    scales = lr_scales or [1.0] * len(groups)
    param_groups = []
    for group, scale in zip(groups, scales):
        decay = [p for p in group if p.ndim > 1]
        exempt = [p for p in group if p.ndim <= 1]
        param_groups += [{"params": decay, "weight_decay": weight_decay, "lr_scale": scale},
                         {"params": exempt, "weight_decay": 0.0, "lr_scale": scale}]
    return create_optimizer_v2([g for g in param_groups if g["params"]], opt=opt, lr=lr,
                               weight_decay=weight_decay, **extra)


def geometric_scales(n_groups: int, low: float, high: float) -> list[float]:
    """Learning-rate scales spreading ``low`` .. ``high`` geometrically over the groups,
    relative to ``high`` (the head's rate)."""
    if n_groups == 1:
        return [1.0]
    ratio = (low / high) ** (1 / (n_groups - 1))
    return [ratio ** (n_groups - 1 - i) for i in range(n_groups)]
