"""The end of a fit: every metric on the validation and test splits, with and without
test-time augmentation, the multi-label threshold chosen on validation, the interpretation
of the validation split (the test split when there is no validation split) and the tensors
``imagefit report`` redraws it from."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed, runs
from .build import LoadedData, TrainingParts
from .config import FitConfig
from .errors import ImagefitError, ImagefitWarning
from .explain import explain_images
from .inference import TTA, LoadedModel, load_model, model_outputs, score
from .metrics import best_threshold
from .report.interpret import interpret, top_losses
from .tasks import Task

INTERPRETATION = "interpretation.json"
INTERPRETATION_TENSORS = "interpretation.safetensors"
TOP_LOSSES = 16
SALIENCY_PLOT = "plots/top_losses_gradcam.png"


def conclude(run_dir: Path, cfg: FitConfig, parts: TrainingParts, loaded: LoadedData,
             model: torch.nn.Module) -> tuple[dict, dict]:
    """Final figures of ``model`` (prefixed valid_, test_, valid_tta_, test_tta_) and, with
    ``cfg.report``, the interpretation files; returns the figures and, per split, the
    table rows and the model's raw outputs on them. Data-parallel, each rank computes its
    share of the outputs and only rank 0 writes."""
    task = parts.task
    images = loaded.prepared.cache.tensor()
    targets = task.encode_targets(loaded.table.targets)
    size = cfg.image_sizes[-1] if cfg.image_sizes else None
    bs = max(parts.batch_size, 256)
    splits = {"valid": loaded.valid_rows, "test": loaded.test_rows}
    shard = distributed.shard()
    tta = TTA.from_options(cfg, loaded.augment) if cfg.tta_n else None
    outputs, tta_outputs = {}, {}
    for name, rows in splits.items():  # with TTA, one pass gives the plain outputs too
        if not len(rows):
            continue
        if tta is None:
            outputs[name] = model_outputs(model, parts.pipeline, task, images, rows, bs,
                                          size=size, precision=cfg.precision, **shard)
        else:
            outputs[name], tta_outputs[name] = model_outputs(
                model, parts.pipeline, task, images, rows, bs, tta, size, plain_too=True,
                precision=cfg.precision, **shard)
    figures: dict = {}
    if task.kind == "multilabel" and "valid" in outputs:
        threshold, _ = best_threshold(task, outputs["valid"], targets[splits["valid"]])
        task.threshold = threshold
        figures["threshold"] = threshold
        if distributed.is_main():
            _store_threshold(run_dir, threshold)
    for name, split_outputs in outputs.items():
        figures.update(_prefixed(f"{name}_", score(task, split_outputs,
                                                   targets[splits[name]])))
    for name, averaged in tta_outputs.items():
        figures.update(_prefixed(f"{name}_tta_", score(task, averaged,
                                                       targets[splits[name]])))
    if cfg.report and outputs and distributed.is_main():
        split = "valid" if "valid" in outputs else "test"
        rows = splits[split]
        paths = [loaded.table.paths[r] for r in rows] if loaded.table.paths else None
        result = save_interpretation(run_dir, task, outputs[split], targets[rows],
                                     lambda positions: images[torch.as_tensor(rows[positions])]
                                     .permute(0, 3, 1, 2), paths, split)
        if task.kind == "classification" and result.get("top_losses"):
            worst = rows[[row["position"] for row in result["top_losses"]]]
            _explain_top_losses(run_dir, parts, loaded, model,
                                images[torch.as_tensor(worst)].permute(0, 3, 1, 2))
    return figures, {name: (splits[name], value) for name, value in outputs.items()}


def _explain_top_losses(run_dir: Path, parts: TrainingParts, loaded: LoadedData,
                        model: torch.nn.Module, images: torch.Tensor) -> None:
    """Grad-CAM of the top losses: where the model looked for the class it predicted."""
    info = parts.model_info
    trained = LoadedModel(model, parts.task, loaded.settings, parts.pipeline, info)
    try:
        explain_images(trained, images, None, "gradcam", Path(run_dir) / SALIENCY_PLOT)
    except ImagefitError as error:  # a model without feature maps (ViT): no plot, say why
        warnings.warn(f"no Grad-CAM of the top losses: {error}", ImagefitWarning, stacklevel=2)
        return
    _list_saliency(run_dir)


def _list_saliency(run_dir: Path) -> None:
    """Add the top losses' Grad-CAM to the interpretation's plots when it was drawn."""
    path = Path(run_dir) / INTERPRETATION
    if not (Path(run_dir) / SALIENCY_PLOT).is_file() or not path.is_file():
        return
    result = runs.load_json(path)
    if all(plot["file"] != SALIENCY_PLOT for plot in result["plots"]):
        result["plots"].append({"name": "saliency", "file": SALIENCY_PLOT,
                                "title": "Grad-CAM of the top losses (the predicted class)"})
        runs.save_json(path, result)


def _prefixed(prefix: str, values: dict) -> dict:
    return {prefix + name: value for name, value in values.items()}


def _store_threshold(run_dir: Path, threshold: float) -> None:
    """The chosen multi-label threshold becomes the model's own (model.json)."""
    path = Path(run_dir) / runs.MODEL_INFO
    if path.is_file():
        info = runs.read_model_info(run_dir)
        info["task"]["threshold"] = threshold
        runs.save_json(path, info)


def save_interpretation(run_dir: Path, task: Task, outputs: torch.Tensor,
                        targets: torch.Tensor, images_for, paths, split: str) -> dict:
    """Interpretation plots and tables, and the tensors to redraw them without the data."""
    worst = top_losses(task, outputs, targets, TOP_LOSSES)
    top_images = images_for(worst) if len(worst) else torch.zeros(0, dtype=torch.uint8)
    save_file({"outputs": outputs.float().contiguous(),
               "targets": targets.float().contiguous(),
               "top_positions": torch.as_tensor(worst, dtype=torch.int64),
               "top_images": top_images.contiguous()},
              str(Path(run_dir) / INTERPRETATION_TENSORS))
    result = interpret(task, outputs, targets, _lookup(worst, top_images),
                       Path(run_dir) / "plots", paths, split, TOP_LOSSES)
    result["top_paths"] = [paths[p] for p in worst] if paths is not None else None
    runs.save_json(Path(run_dir) / INTERPRETATION, result)
    return result


def redraw_interpretation(run_dir: Path) -> dict | None:
    """The interpretation again from the run's saved tensors (no data needed); None when the
    run has none."""
    run_dir = Path(run_dir)
    tensors_path = run_dir / INTERPRETATION_TENSORS
    if not tensors_path.is_file() or not (run_dir / runs.MODEL_INFO).is_file():
        return None
    tensors = load_file(str(tensors_path))
    task = Task.from_dict(runs.read_model_info(run_dir)["task"])
    previous = runs.load_json(run_dir / INTERPRETATION) if (
        run_dir / INTERPRETATION).is_file() else {}
    targets = tensors["targets"]
    if task.kind == "classification":
        targets = targets.long()
    worst = tensors["top_positions"].numpy()
    top_paths = previous.get("top_paths")
    paths = None
    if top_paths is not None:  # only the top items' paths are kept
        paths = [""] * len(tensors["outputs"])
        for position, path in zip(worst.tolist(), top_paths):
            paths[position] = path
    result = interpret(task, tensors["outputs"], targets, _lookup(worst, tensors["top_images"]),
                       run_dir / "plots", paths, previous.get("split", "valid"), TOP_LOSSES)
    result["top_paths"] = top_paths
    runs.save_json(run_dir / INTERPRETATION, result)
    if task.kind == "classification" and len(worst):
        order = [row["position"] for row in result["top_losses"]]
        images = _lookup(worst, tensors["top_images"])(np.asarray(order))
        try:
            explain_images(load_model(run_dir, "cpu"), images, None, "gradcam",
                           run_dir / SALIENCY_PLOT)
        except ImagefitError as error:
            warnings.warn(f"no Grad-CAM of the top losses: {error}", ImagefitWarning,
                          stacklevel=2)
    _list_saliency(run_dir)
    return runs.load_json(run_dir / INTERPRETATION)


def _lookup(positions: np.ndarray, images: torch.Tensor):
    """images_for() over the saved top-loss images."""
    index = {int(p): i for i, p in enumerate(np.asarray(positions).tolist())}

    def images_for(wanted: np.ndarray) -> torch.Tensor:
        return images[[index[int(p)] for p in np.asarray(wanted).tolist()]]

    return images_for
