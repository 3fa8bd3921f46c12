"""The dataset summary of a fit: counts per class and split, original image sizes, sample
images, normalization statistics and exact duplicates, as a JSON-ready dict and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..data.cache import ImageCache  # noqa: E402
from ..data.duplicates import find_duplicates  # noqa: E402
from ..data.sources import Table  # noqa: E402
from .plots import label_text, save_figure, save_image_grid  # noqa: E402

SPLITS = ("train", "valid", "test")
SPLIT_COLORS = {"train": "tab:blue", "valid": "tab:orange", "test": "tab:green"}
MAX_BAR_CLASSES = 30
MAX_SAMPLE_CLASSES = 20
SAMPLE_GRID_ROWS = 4
MAX_PLOTTED_TARGETS = 4
MAX_SCATTER_POINTS = 5_000
CHANNEL_NAMES = {1: ("grey",), 3: ("red", "green", "blue")}


def summarize_dataset(
    table: Table,
    cache: ImageCache,
    splits: dict[str, np.ndarray],
    mean: list[float],
    std: list[float],
    plots_dir: Path,
    samples_per_class: int = 8,
    seed: int = 0,
) -> dict:
    """What a fit was trained and evaluated on, for the run report.

    ``splits`` maps 'train', 'valid' and 'test' to row indices of ``table`` (and of ``cache``);
    rows the cache could not read are left out everywhere and counted as ``unreadable``.
    Plots go to ``plots_dir`` and are listed under ``plots`` with paths relative to the run
    directory. Class names appear as given: whoever renders the dict escapes them.
    """
    plots_dir = Path(plots_dir)
    split_of = _split_labels(len(table), splits, cache.failed)
    rows = {name: np.flatnonzero(split_of == k) for k, name in enumerate(SPLITS)}
    used = np.flatnonzero(split_of >= 0)
    summary: dict = {
        "task": table.task.kind,
        "n_images": len(used),
        "unreadable": len(cache.errors),
        "image_size": int(cache.images.shape[1]),
        "channels": int(cache.images.shape[3]),
        "split_sizes": [{"split": s, "images": len(rows[s])} for s in SPLITS],
        "normalization": _channel_rows(mean, std),
        "notes": [],
        "plots": [],
    }

    def add_plot(title: str, path: Path | None) -> None:
        if path is not None:
            summary["plots"].append({"title": title, "file": f"{plots_dir.name}/{path.name}"})

    if table.task.single_label:
        summary.update(_class_counts(table, rows, plots_dir, summary["notes"], add_plot))
    elif table.task.multi_label:
        summary.update(_label_counts(table, rows, plots_dir, add_plot))
    else:
        summary.update(_target_stats(table, rows, plots_dir, summary["notes"], add_plot))
    summary.update(_size_summary(cache.original_sizes[used], plots_dir, summary["notes"],
                                 add_plot))
    add_plot("Training samples", _sample_grid(table, cache, rows["train"], plots_dir,
                                              samples_per_class, seed, summary["notes"]))
    summary.update(find_duplicates(table, cache, split_of))
    return summary


def _split_labels(count: int, splits: dict[str, np.ndarray], failed: list[int]) -> np.ndarray:
    """Per table row: the index of its split in SPLITS, or -1 when unused or unreadable."""
    split_of = np.full(count, -1, dtype=np.int8)
    for k, name in enumerate(SPLITS):
        split_of[np.asarray(splits.get(name, []), dtype=np.int64)] = k
    split_of[np.asarray(failed, dtype=np.int64)] = -1
    return split_of


def _channel_rows(mean: list[float], std: list[float]) -> list[dict]:
    names = CHANNEL_NAMES.get(len(mean), tuple(str(i) for i in range(len(mean))))
    return [{"channel": n, "mean": float(m), "std": float(s)}
            for n, m, s in zip(names, mean, std)]


# -- counts -------------------------------------------------------------------------------


def _count_rows(key: str, names: list[str], counts: dict[str, np.ndarray]) -> list[dict]:
    return [{key: name, **{s: int(counts[s][i]) for s in SPLITS}}
            for i, name in enumerate(names)]


def _class_counts(table, rows, plots_dir, notes, add_plot) -> dict:
    names = list(table.task.names)
    targets = np.asarray(table.targets)
    counts = {s: np.bincount(targets[rows[s]], minlength=len(names)) for s in SPLITS}
    train = counts["train"]
    low, high = int(np.argmin(train)), int(np.argmax(train))
    if train[low] == train[high]:
        notes.append(f"every class has {train[low]} training images")
    else:
        notes.append(f"training images per class range from {train[low]} ('{names[low]}') "
                     f"to {train[high]} ('{names[high]}')")
    add_plot("Images per class", _save_count_bars(names, counts, "images",
                                                  plots_dir / "data_classes.png"))
    return {"n_classes": len(names), "class_counts": _count_rows("class", names, counts)}


def _label_counts(table, rows, plots_dir, add_plot) -> dict:
    names = list(table.task.names)
    targets = np.asarray(table.targets) > 0.5
    counts = {s: targets[rows[s]].sum(axis=0) for s in SPLITS}
    per_image = {s: targets[rows[s]].sum(axis=1) for s in SPLITS}
    most = max((int(v.max()) for v in per_image.values() if len(v)), default=0)
    distribution = {s: np.bincount(v, minlength=most + 1) for s, v in per_image.items()}
    add_plot("Images per label", _save_count_bars(names, counts, "images",
                                                  plots_dir / "data_classes.png"))
    add_plot("Labels per image", _save_count_bars([str(k) for k in range(most + 1)],
                                                  distribution, "images",
                                                  plots_dir / "data_labels_per_image.png",
                                                  ylabel="labels per image"))
    return {"n_classes": len(names), "label_counts": _count_rows("label", names, counts),
            "labels_per_image": _count_rows("labels", list(range(most + 1)), distribution)}


def _save_count_bars(names: list[str], counts: dict[str, np.ndarray], xlabel: str,
                     path: Path, ylabel: str | None = None) -> Path:
    """Horizontal bars per name, one per non-empty split; past 30 names the 15 most and 15
    least common (by total) with a gap between them."""
    shown_splits = [s for s in SPLITS if counts[s].sum() > 0] or ["train"]
    order = np.arange(len(names))
    title = f"{xlabel} per {ylabel or 'class'} and split"
    if len(names) > MAX_BAR_CLASSES:
        total = sum(counts[s] for s in SPLITS)
        ranked = np.argsort(-total, kind="stable")
        half = MAX_BAR_CLASSES // 2
        order = np.concatenate([ranked[:half], ranked[-half:]])
        title = f"the {half} most and {half} least common of {len(names)} (all in the table)"
    band = 0.8 / len(shown_splits)
    positions = np.arange(len(order), dtype=float)
    if len(names) > MAX_BAR_CLASSES:
        positions[MAX_BAR_CLASSES // 2:] += 1.0
    figure, axis = plt.subplots(figsize=(7.5, 1.4 + 0.3 * len(order) * max(1, len(shown_splits)
                                                                              / 2)))
    for k, split in enumerate(shown_splits):
        axis.barh(positions + (k - (len(shown_splits) - 1) / 2) * band, counts[split][order],
                  height=band, color=SPLIT_COLORS[split], label=split)
    axis.set_yticks(positions, [label_text(names[i]) for i in order], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel(xlabel)
    if ylabel:
        axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(figure, path)


def _target_stats(table, rows, plots_dir, notes, add_plot) -> dict:
    names = list(table.task.names)
    targets = np.asarray(table.targets, dtype=np.float64).reshape(len(table), -1)
    stats = []
    for t, name in enumerate(names):
        for split in SPLITS:
            values = targets[rows[split], t]
            described = ({"min": float(values.min()), "mean": float(values.mean()),
                          "max": float(values.max()), "std": float(values.std())}
                         if len(values) else dict.fromkeys(("min", "mean", "max", "std")))
            stats.append({"target": name, "split": split, "images": len(values), **described})
    plotted = names[:MAX_PLOTTED_TARGETS]
    if len(names) > len(plotted):
        notes.append(f"target histograms show the first {len(plotted)} of {len(names)} "
                     "targets")
    figure, axes = plt.subplots(1, len(plotted), figsize=(4.5 * len(plotted), 3.4),
                                squeeze=False)
    for t, axis in enumerate(axes[0]):
        column = targets[np.concatenate([rows[s] for s in SPLITS]), t]
        bins = np.histogram_bin_edges(column, bins=30)
        for split in SPLITS:
            if len(rows[split]):
                axis.hist(targets[rows[split], t], bins=bins, histtype="step", linewidth=1.5,
                          color=SPLIT_COLORS[split], label=split)
        axis.set_title(label_text(names[t]), fontsize=10)
        axis.set_xlabel("target value")
        axis.set_ylabel("images")
        axis.legend(fontsize=8)
    add_plot("Target distribution", save_figure(figure, plots_dir / "data_targets.png"))
    return {"target_stats": stats}


# -- image sizes --------------------------------------------------------------------------


def _size_summary(sizes: np.ndarray, plots_dir, notes, add_plot) -> dict:
    """Original (width, height) statistics, and their plot when the sizes differ."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if not len(sizes):
        return {"original_sizes": [], "distinct_sizes": 0}
    distinct, counts = np.unique(sizes, axis=0, return_counts=True)
    common = distinct[np.argmax(counts)]
    result = {
        "original_sizes": [
            {"dimension": name, "min": int(sizes[:, d].min()),
             "median": float(np.median(sizes[:, d])), "max": int(sizes[:, d].max())}
            for d, name in enumerate(("width", "height"))
        ],
        "distinct_sizes": len(distinct),
        "most_common_size": f"{common[0]}x{common[1]}",
        "most_common_size_share": float(counts.max() / len(sizes)),
    }
    if len(distinct) == 1:
        notes.append(f"all images were {common[0]}x{common[1]} before caching")
        return result
    figure, (hist, scatter) = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.histogram_bin_edges(sizes, bins=40)
    hist.hist(sizes[:, 0], bins=bins, histtype="step", linewidth=1.5, label="width")
    hist.hist(sizes[:, 1], bins=bins, histtype="step", linewidth=1.5, label="height")
    hist.set_xlabel("pixels")
    hist.set_ylabel("images")
    hist.legend(fontsize=8)
    shown = sizes
    if len(sizes) > MAX_SCATTER_POINTS:
        shown = sizes[np.random.default_rng(0).choice(len(sizes), MAX_SCATTER_POINTS,
                                                      replace=False)]
    scatter.scatter(shown[:, 0], shown[:, 1], s=6, alpha=0.3)
    scatter.set_xlabel("width")
    scatter.set_ylabel("height")
    scatter.set_title(f"most common {common[0]}x{common[1]} "
                      f"({result['most_common_size_share']:.0%})", fontsize=10)
    add_plot("Original image sizes", save_figure(figure, plots_dir / "data_sizes.png"))
    return result


# -- samples ------------------------------------------------------------------------------


def _as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def _sample_grid(table, cache, train_rows, plots_dir, per_class, seed, notes) -> Path | None:
    """One row of random training images per class; regression: images spread over the
    target's range, sorted by it; multilabel: random images with their labels."""
    if not len(train_rows) or per_class < 1:
        return None
    rng = np.random.default_rng(seed)
    path = plots_dir / "data_samples.png"
    names = list(table.task.names)
    grid_size = per_class * SAMPLE_GRID_ROWS
    if not table.task.has_classes:
        values = np.asarray(table.targets, dtype=np.float64).reshape(len(table), -1)[:, 0]
        ordered = train_rows[np.argsort(values[train_rows], kind="stable")]
        chosen = ordered[np.unique(np.linspace(0, len(ordered) - 1, grid_size).round()
                                   .astype(np.int64))]
        titles = [f"{values[r]:.4g}" for r in chosen]
        return save_image_grid(_as_float(cache.read(chosen)), titles, path,
                               columns=min(per_class, len(chosen)),
                               title=f"sorted by {label_text(names[0])}")
    if table.task.multi_label:
        chosen = np.sort(rng.choice(train_rows, min(grid_size, len(train_rows)),
                                    replace=False))
        targets = np.asarray(table.targets) > 0.5
        titles = [label_text(", ".join(n for n, on in zip(names, targets[r]) if on) or "(none)",
                         24) for r in chosen]
        return save_image_grid(_as_float(cache.read(chosen)), titles, path,
                               columns=min(per_class, len(chosen)))
    if len(names) > MAX_SAMPLE_CLASSES:
        notes.append(f"the sample grid shows the first {MAX_SAMPLE_CLASSES} of {len(names)} "
                     "classes")
    classes = names[:MAX_SAMPLE_CLASSES]
    targets = np.asarray(table.targets)[train_rows]
    size, channels = cache.images.shape[1], cache.images.shape[3]
    step = size + max(1, size // 14)
    mosaic = np.full((len(classes) * step, per_class * step, channels), 255, dtype=np.uint8)
    labels = []
    for c, name in enumerate(classes):
        members = train_rows[targets == c]
        picked = np.sort(rng.choice(members, min(per_class, len(members)), replace=False))
        for k, image in enumerate(cache.read(picked)):
            mosaic[c * step:c * step + size, k * step:k * step + size] = image
        labels.append(label_text(name) + ("" if len(members) else " (no training images)"))
    figure, axis = plt.subplots(figsize=(2.4 + 1.1 * per_class, 0.4 + 1.1 * len(classes)))
    axis.imshow(mosaic[..., 0] if channels == 1 else mosaic, cmap="gray", vmin=0, vmax=255)
    axis.set_yticks(np.arange(len(classes)) * step + size / 2, labels, fontsize=9)
    axis.set_xticks([])
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    return save_figure(figure, path)
