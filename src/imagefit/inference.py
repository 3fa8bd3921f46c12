"""Using a trained model: loading it from its run directory, predicting files, folders
and CSVs, and evaluating it on a dataset split."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from . import runs
from .augment.pipeline import BatchPipeline
from .build import resolve_device
from .config import (
    EvaluateOptions,
    PredictOptions,
    SourceOptions,
    merge_options,
)
from .data.cache import CacheSettings, build_cache, warn_unreadable
from .data.loader import Loader
from .data.prepare import prepare_images
from .data.sources import IMAGE_EXTENSIONS, Table, read_csv_paths, read_source
from .data.splits import assign_validation
from .errors import ImagefitError, ImagefitWarning
from .metrics import compute_metrics
from .models import (
    create_model,
)
from .tasks import Task


@dataclass
class LoadedModel:
    """A trained model with what it needs to see images as it saw them in training."""

    model: nn.Module
    task: Task
    settings: CacheSettings
    pipeline: BatchPipeline
    info: dict


def load_model(run: str | Path, device: str = "auto") -> LoadedModel:
    """The model of a run directory, from safetensors + JSON (no code is unpickled)."""
    info = runs.read_model_info(run)
    task = Task.from_dict(info["task"])
    model = create_model(info["architecture"], info["channels"], task.n_out,
                         head=info.get("head", "timm"))
    runs.load_weights(model, run)
    model = model.to(resolve_device(device), memory_format=torch.channels_last).eval()
    settings = CacheSettings(info["image_size"], info["channels"], info["resize"])
    norm = info["normalization"]
    return LoadedModel(model, task, settings, BatchPipeline(norm["mean"], norm["std"]), info)


@torch.no_grad()
def _outputs(loaded: LoadedModel, images: torch.Tensor, rows: np.ndarray,
             batch_size: int) -> torch.Tensor:
    device = next(loaded.model.parameters()).device
    dummy = torch.zeros(len(images))
    loader = Loader(images, dummy, rows, batch_size, device=device)
    if len(rows) == 0:
        return torch.zeros(0, loaded.task.n_out)
    return torch.cat([loaded.model(loaded.pipeline(x)).float().cpu() for x, _ in loader])


def _expand_inputs(inputs: list[str | Path], options: PredictOptions) -> list[str]:
    """Image files from files, folders (searched recursively) and CSV files of paths."""
    paths: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(str(p) for p in item.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImagefitError(f"folder {item} holds no image files")
            paths += found
        elif item.suffix.lower() == ".csv" and item.is_file():
            options_for_csv = SourceOptions(path_col=options.path_col, folder=options.folder,
                                            suffix=options.suffix)
            paths += read_csv_paths(item, options_for_csv)
        elif item.is_file():
            paths.append(str(item))
        else:
            raise ImagefitError(f"input {item} not found: give image files, folders or a CSV")
    return paths


def predict(run: str | Path, inputs: list[str | Path], out: str | Path | None = None,
            options: PredictOptions | None = None, **overrides: Any) -> pd.DataFrame:
    """Predictions for image files, folders or CSVs of paths: a row per readable image with
    the path, the predicted label(s) or value(s) and the class probabilities."""
    options = merge_options(PredictOptions, options, overrides)
    loaded = load_model(run, options.device)
    paths = _expand_inputs(list(inputs), options)
    cache = build_cache(paths, loaded.settings, options.cache_dir, progress=options.progress)
    warn_unreadable(cache, paths)
    rows = np.setdiff1d(np.arange(len(paths)), cache.failed)
    activated = loaded.task.activate(_outputs(loaded, cache.tensor(), rows, options.bs))
    frame = pd.DataFrame({"path": [paths[r] for r in rows]})
    task = loaded.task
    if task.kind == "regression":
        for i, name in enumerate(task.names):
            frame[name] = activated[:, i].numpy()
    else:
        frame["labels" if task.kind == "multilabel" else "label"] = task.decode(activated)
        for i, name in enumerate(task.names):
            frame[f"prob_{name}"] = activated[:, i].numpy()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        runs.write_atomic(Path(out), frame.to_csv(index=False))
    return frame


def _align_targets(table: Table, task: Task) -> np.ndarray:
    """The table's targets in the order of the model's classes or targets."""
    names = table.task.names
    if table.task.kind != task.kind:
        raise ImagefitError(
            f"the data's targets are {table.task.kind} but the model was trained for "
            f"{task.kind}: pass --task {task.kind} or give matching data"
        )
    unknown = [n for n in names if n not in task.names]
    if task.kind == "regression":
        if len(names) != len(task.names):
            raise ImagefitError(
                f"the data has {len(names)} target(s), the model {len(task.names)} "
                f"({', '.join(task.names)}): choose them with --label-col"
            )
        return table.targets
    if unknown:
        raise ImagefitError(
            f"the data has classes the model was not trained on: {', '.join(unknown[:5])}"
        )
    position = np.array([task.names.index(n) for n in names])
    if task.kind == "classification":
        return position[table.targets]
    aligned = np.zeros((len(table), task.n_out), dtype=np.float32)
    aligned[:, position] = table.targets
    return aligned


def evaluate(run: str | Path, data: str | Path | Table, out: str | Path | None = None,
             options: EvaluateOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Loss and metrics of a run's model on a split of ``data``: the test split when there is
    one, else the validation split carved as the run carved it."""
    options = merge_options(EvaluateOptions, options, overrides)
    loaded = load_model(run, options.device)
    run_config = _read_run_config(Path(run))
    table = data if isinstance(data, Table) else read_source(data, options)
    split = options.split or ("test" if table.has_split("test") else "valid")
    if split == "valid":
        table = assign_validation(table, run_config.get("valid_pct", 0.2),
                                  run_config.get("seed", 0), run_config.get("stratify", True))
    prepared = prepare_images(table, loaded.settings, cache_dir=options.cache_dir,
                              strict=options.strict, progress=options.progress)
    rows = prepared.rows(table, split)
    if len(rows) == 0:
        raise ImagefitError(f"{table.description} has no {split} images: choose --split")
    targets = loaded.task.encode_targets(_align_targets(table, loaded.task))
    outputs = _outputs(loaded, prepared.cache.tensor(), rows, options.bs)
    results: dict[str, Any] = {"split": split, "n_images": len(rows),
                               "loss": loaded.task.loss(outputs, targets[rows]).item()}
    results.update(compute_metrics(loaded.task, outputs, targets[rows]))
    if out is not None:
        runs.save_json(Path(out), results)
    return results


def _read_run_config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        warnings.warn(f"{path} is missing: the validation split uses the default fraction "
                      "and seed", ImagefitWarning, stacklevel=3)
        return {}
    return yaml.safe_load(path.read_text()) or {}
