"""Layer groups (stem, stages, head) for freezing and discriminative learning rates."""

from __future__ import annotations

from timm.models import group_parameters
from torch import nn


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The model's parameters from input to output in coarse groups (timm's group_matcher:
    stem, each stage, head); one group when the model has no matcher. The last group holds
    the classifier."""
    if hasattr(model, "body") and hasattr(model, "head"):  # models.heads.WithHead
        return [*layer_groups(model.body), list(model.head.parameters())]
    if not hasattr(model, "group_matcher"):
        return [list(model.parameters())]
    named = dict(model.named_parameters())
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    return [[named[name] for name in names] for _, names in sorted(grouped.items())]


def set_trainable(model: nn.Module, groups: list[list[nn.Parameter]], first_trainable: int,
                  train_bn: bool = True) -> None:
    """Freeze every group before ``first_trainable`` (negative counts from the end); with
    ``train_bn`` the frozen groups' BatchNorm weights keep training, as fastai does."""
    first_trainable %= len(groups)
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                   for p in m.parameters()}
    for index, group in enumerate(groups):
        for parameter in group:
            parameter.requires_grad_(index >= first_trainable
                                     or (train_bn and id(parameter) in norm_params))
