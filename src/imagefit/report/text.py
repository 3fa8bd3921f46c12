"""The interpretation of a text model: the classification plots and tables of ``interpret``
(confusion, curves, reliability, most confused pairs), the top losses as a table of the texts
themselves, and accuracy by text length (short names carry few characters to go on; long ones
are cut at the model's length)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import runs
from ..tasks import Task
from .interpret import interpret
from .interpretation import INTERPRETATION, TOP_LOSSES
from .plots import save_figure

LENGTH_PLOT = "plots/accuracy_by_length.png"
TAIL_SHARE = 0.01  # lengths rarer than this at either end share a row


def length_groups(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Ranges of text length (first, last), one per length, except that the rare shortest
    and longest lengths (under 1% of the texts together at each end) share one range."""
    values, counts = np.unique(lengths, return_counts=True)
    if not len(values):
        return []
    limit = TAIL_SHARE * len(lengths)
    low = 0
    while low < len(values) - 1 and counts[:low + 1].sum() < limit:
        low += 1
    high = len(values) - 1
    while high > low and counts[high:].sum() < limit:
        high -= 1
    groups = [(int(values[0]), int(values[low]))]
    groups += [(int(v), int(v)) for v in values[low + 1:high]]
    if high > low:
        groups.append((int(values[high]), int(values[-1])))
    return groups


def by_length(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
              texts: Sequence[str], length: int) -> list[dict]:
    """Accuracy (classification) or mean absolute error (regression) per range of text
    length; ``cut``: the texts longer than the model's ``length`` read only in part."""
    lengths = np.array([len(t) for t in texts])
    if task.single_label:
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets.long()
        good = (outputs.argmax(dim=1) == labels).numpy().astype(float)
        name = "accuracy"
    elif not task.has_classes:
        good = task.item_losses(outputs, targets).numpy()
        name = "mae"
    else:
        return []
    rows = []
    for first, last in length_groups(lengths):
        inside = (lengths >= first) & (lengths <= last)
        rows.append({"length": str(first) if first == last else f"{first}-{last}",
                     "texts": int(inside.sum()), name: float(good[inside].mean()),
                     "cut": bool(last > length)})
    return rows


def save_length_plot(rows: list[dict], path: Path, split: str) -> Path:
    metric = "accuracy" if "accuracy" in rows[0] else "mae"
    figure, axis = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 2), 3.4))
    positions = np.arange(len(rows))
    axis.bar(positions, [row[metric] for row in rows], color="#4c72b0")
    axis.set_xticks(positions, [row["length"] for row in rows], rotation=45 if len(rows) > 14
                    else 0)
    axis.set_xlabel("text length (characters)")
    axis.set_ylabel(metric)
    if metric == "accuracy":
        axis.set_ylim(0, 1.05)
    for x, row in zip(positions, rows):
        axis.annotate(str(row["texts"]), (x, row[metric]), ha="center", va="bottom",
                      fontsize=7, color="#555")
    axis.set_title(f"{metric.upper() if metric == 'mae' else 'Accuracy'} by text length "
                   f"({split} split; numbers: texts)")
    return save_figure(figure, path)


def save_text_interpretation(run_dir: Path, task: Task, outputs: torch.Tensor,
                             targets: torch.Tensor, texts: Sequence[str], split: str,
                             length: int) -> dict:
    """interpretation.json and its plots for texts: the top losses name their texts, and a
    table and plot of the metric per text length are added."""
    run_dir = Path(run_dir)
    outputs, targets = outputs.float().cpu(), targets.cpu()
    result = interpret(task, outputs, targets, None, run_dir / "plots", None, split,
                       TOP_LOSSES)
    result["n_texts"] = result.pop("n_images", len(texts))
    result["top_losses"] = [{"text": texts[row["position"]], **row}
                            for row in result.get("top_losses", [])]
    rows = by_length(task, outputs, targets, texts, length)
    if rows:
        result["by_length"] = rows
        save_length_plot(rows, run_dir / LENGTH_PLOT, split)
        result["plots"].append({"name": "by_length", "file": LENGTH_PLOT,
                                "title": f"Metric by text length ({split} split)"})
    runs.save_json(run_dir / INTERPRETATION, result)
    return result
