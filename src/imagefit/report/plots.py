"""Plots saved as PNG files."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def save_figure(figure, path: str | Path) -> Path:
    """Lay out, save as PNG (creating the folder) and close; fonts without a glyph for some
    character of a user's label are not worth a warning."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def label_text(text: object, width: int = 28) -> str:
    """A user's string as plot text: one line, at most ``width`` characters, and its dollar
    signs escaped so that matplotlib never reads it as mathtext."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    if len(text) > width:
        text = text[:width - 1] + "…"
    return text.replace("$", r"\$")


def save_image_grid(images: torch.Tensor, titles: Sequence[str], path: str | Path,
                    columns: int | None = None, title: str | None = None) -> Path:
    """A grid of float images in [0, 1] (N, C, H, W), each with its title, as a PNG."""
    count = len(images)
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.2 * rows),
                                squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        image = images[index].detach().float().cpu().clamp(0, 1)
        if image.shape[0] == 1:
            axis.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(titles[index], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def save_lr_finder_plot(result, path: str | Path) -> Path:
    """Smoothed loss against learning rate (log scale) with the suggestions marked."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(result.lrs, result.losses, color="tab:blue")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("loss (smoothed)")
    markers = {"steepest": "tab:red", "valley": "tab:green", "minimum/10": "tab:orange"}
    for name, lr in result.suggestions.items():
        loss = min(zip(result.lrs, result.losses), key=lambda pair: abs(pair[0] - lr))[1]
        axis.scatter([lr], [loss], color=markers.get(name, "black"), zorder=3,
                     label=f"{name}: {lr:.1e}")
    if result.suggestions:
        axis.legend()
    axis.set_title("LR finder")
    return save_figure(figure, path)


def save_training_plot(step_log: list[dict], history: list[dict], path: str | Path) -> Path:
    """Learning rate and momentum per step, and loss per step (raw and moving average) with
    validation loss per epoch."""
    steps = [row["step"] for row in step_log]
    figure, (rates, moms, losses) = plt.subplots(1, 3, figsize=(14, 3.6))
    rates.plot(steps, [row["lr"] for row in step_log])
    rates.set_title("learning rate")
    momentum = [row["momentum"] for row in step_log]
    if any(m is not None for m in momentum):
        moms.plot(steps, momentum)
    moms.set_title("momentum (beta1)")
    loss = [float(row.get("loss", float("nan"))) for row in step_log]
    losses.plot(steps, loss, alpha=0.3, label="train (step)")
    window = max(1, len(loss) // 50)
    kernel = np.ones(window) / window
    if len(loss) >= window:
        losses.plot(steps[window - 1:], np.convolve(loss, kernel, mode="valid"),
                    label=f"train (mean of {window})")
    if history and "valid_loss" in history[0] and steps:
        per_epoch = len(steps) / len(history)
        losses.plot([per_epoch * (i + 1) for i in range(len(history))],
                    [row["valid_loss"] for row in history], "o-", label="valid (epoch)")
    losses.set_title("loss")
    losses.legend()
    for axis in (rates, moms, losses):
        axis.set_xlabel("step")
    return save_figure(figure, path)


def save_metrics_plot(history: list[dict], path: str | Path) -> Path:
    """Loss and each metric per epoch: training, validation and (when measured) test."""
    epochs = [row["epoch"] for row in history]
    metrics = list(dict.fromkeys(
        key.split("_", 1)[1] for row in history[:1] for key in row
        if key.startswith(("valid_", "test_")) and key.split("_", 1)[1] != "loss"))
    panels = ["loss", *metrics]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4),
                                squeeze=False)
    for axis, name in zip(axes[0], panels):
        for split, style in (("train", "-"), ("valid", "o-"), ("test", "s--")):
            column = f"{split}_{name}"
            if column in history[0]:
                axis.plot(epochs, [row[column] for row in history], style, label=split)
        axis.set_title(name.replace("_", " "))
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=8)
    return save_figure(figure, path)


def save_sweep_plot(curves: dict[str, dict[str, list]], path: str | Path) -> Path:
    """Models compared by their losses per epoch (``curves``: model -> its ``epoch``,
    ``train_loss`` and ``valid_loss`` lists): training (solid) and validation (dashed) loss
    on one axes, one colour per model, and beside them the generalization gap (validation
    loss less training loss)."""
    figure, (losses, gaps) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = plt.get_cmap("tab10")
    for index, (model, curve) in enumerate(curves.items()):
        colour = colours(index % 10)
        epochs = curve["epoch"]
        train, valid = np.asarray(curve["train_loss"]), np.asarray(curve["valid_loss"])
        losses.plot(epochs, train, "-", marker=".", color=colour, label=label_text(model))
        losses.plot(epochs, valid, "--", marker=".", color=colour)
        gaps.plot(epochs, valid - train, "o-", color=colour, label=label_text(model))
    styles = [plt.Line2D([], [], color="black", linestyle=s) for s in ("-", "--")]
    if curves:
        legend = losses.legend(loc="upper right", fontsize=8)
        losses.add_artist(legend)
        losses.legend(styles, ["train", "valid"], loc="upper center", fontsize=8)
        gaps.legend(fontsize=8)
    gaps.axhline(0.0, color="grey", linewidth=0.8)
    losses.set_title("loss: train (solid), valid (dashed)")
    gaps.set_title("generalization gap: valid loss - train loss")
    for axis in (losses, gaps):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(figure, path)
