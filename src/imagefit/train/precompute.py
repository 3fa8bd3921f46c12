"""Precomputed activations: run the frozen body once over the (unaugmented) images, keep its
pooled features, and train the classifier on them; each epoch then costs a few matrix
products instead of full forward passes."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..data.loader import Loader
from ..errors import ImagefitError
from .optim import make_optimizer
from .schedules import one_cycle
from .step import training_step


def body_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features before the classifier (timm's forward_features + pre-logits head)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def supports_precompute(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "get_classifier")


@torch.no_grad()
def precompute(model: nn.Module, loader: Loader, pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and targets of every batch of ``loader``, body in eval mode, no augmentation."""
    if not supports_precompute(model):
        raise ImagefitError(f"{type(model).__name__} cannot precompute features: choose a "
                            "timm model, or leave out --precompute-epochs")
    model.eval()
    features, targets = [], []
    for x, y in loader:
        features.append(body_features(model, pipeline(x)).float())
        targets.append(y)
    return loader.gather(torch.cat(features)), loader.gather(torch.cat(targets))


def fit_head_on_features(learner, epochs: int, lr: float) -> float:
    """Train the learner's classifier for ``epochs`` (one-cycle) on precomputed features;
    rows join ``learner.history`` and the learner's callbacks see each ``after_epoch``.
    Returns the seconds spent computing the features."""
    started = time.perf_counter()
    plain = Loader(learner.train_loader.images, learner.train_loader.targets,
                   learner.train_loader.rows.numpy(), learner.train_loader.batch_size * 2,
                   device=learner.device, rank=learner.train_loader.rank,
                   world_size=learner.train_loader.world_size,
                   counts=learner.train_loader.counts, places=learner.train_loader.places)
    train_x, train_y = precompute(learner.model, plain, learner.pipeline)
    valid = (precompute(learner.model, learner.valid_loader, learner.pipeline)
             if learner.valid_loader is not None else None)
    feature_seconds = time.perf_counter() - started
    head = learner.model.get_classifier()
    optimizer = make_optimizer(head, learner.optimizer_name, lr, learner.weight_decay)
    schedule = one_cycle(lr)
    batch = learner.train_loader.batch_size
    steps_per_epoch = max(len(train_x) // batch, 1)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        epoch_started = time.perf_counter()
        head.train()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(
            learner.seed * 7919 + epoch))
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = schedule((epoch * steps_per_epoch + step) / total)
            index = order[step * batch:(step + 1) * batch].to(train_x.device)
            value = training_step(head, train_x[index], train_y[index], learner.training_loss,
                                  optimizer, grad_clip=learner.grad_clip,
                                  skip_non_finite=True).item()
            if not math.isfinite(value):
                raise learner.diverged(epoch * steps_per_epoch + step, "the training loss")
            loss_sum += value * len(index)
            seen += len(index)
        row = {"epoch": len(learner.history) + 1, "train_loss": loss_sum / max(seen, 1)}
        if valid is not None:
            with torch.no_grad():
                head.eval()
                outputs = head(valid[0])
            scores = learner.score(outputs, valid[1])
            row.update({f"valid_{k}": v for k, v in scores.items()})
        row["time"] = time.perf_counter() - epoch_started
        learner.check_epoch_finite(row)
        learner.history.append(row)
        learner.epoch, learner.n_epochs = epoch, epochs
        learner.emit("after_epoch")
    return feature_seconds
