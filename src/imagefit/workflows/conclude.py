"""The end of a fit: every metric on the validation and test splits, with and without
test-time augmentation, the multi-label threshold chosen on validation, the interpretation
of the validation split (the test split when there is no validation split) with the
feature maps of its first image, the tensors ``imagefit report`` redraws it from, and the
model summary of the report's config section."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .. import distributed, run_records, runs
from ..config import FitConfig
from ..errors import ImagefitError, ImagefitWarning
from ..evaluation.inference import LoadedModel, score
from ..forward import TTA, model_outputs
from ..metrics import best_threshold
from ..report.interpretation import (
    SALIENCY_PLOT,
    list_saliency,
    save_first_feature_maps,
    save_interpretation,
)
from ..report.model_summary import save_model_summary
from ..report.overlays import explain_images
from ..report.text import save_text_interpretation
from .build import TrainingParts
from .loading import LoadedData


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
    tta = TTA.from_options(cfg, loaded.augment) if cfg.tta_n else None
    outputs, tta_outputs = {}, {}
    for name, rows in splits.items():  # with TTA, one pass gives the plain outputs too
        if not len(rows):
            continue
        rows, shard = loaded.own_rows(name)
        if tta is None:
            outputs[name] = model_outputs(model, parts.pipeline, task, images, rows, bs,
                                          size=size, precision=cfg.precision, **shard)
        else:
            outputs[name], tta_outputs[name] = model_outputs(
                model, parts.pipeline, task, images, rows, bs, tta, size, plain_too=True,
                precision=cfg.precision, **shard)
    figures: dict = {}
    if task.chooses_threshold and "valid" in outputs:
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
    trained = LoadedModel(model, task, loaded.settings, parts.pipeline, parts.model_info,
                          cfg.precision)
    if cfg.report and outputs and distributed.is_main() and not trained.input.reads_images:
        split = "valid" if "valid" in outputs else "test"
        rows = splits[split]
        save_text_interpretation(run_dir, task, outputs[split], targets[rows],
                                 [loaded.table.texts[r] for r in rows], split,
                                 loaded.prepared.length)
    elif cfg.report and outputs and distributed.is_main():
        split = "valid" if "valid" in outputs else "test"
        rows = splits[split]
        paths = [loaded.table.paths[r] for r in rows] if loaded.table.paths else None

        def pictures(chosen: np.ndarray) -> torch.Tensor:  # a shard decodes what it lacks
            return torch.from_numpy(loaded.prepared.cache.read(chosen)).permute(0, 3, 1, 2)

        result = save_interpretation(run_dir, task, outputs[split], targets[rows],
                                     lambda positions: pictures(rows[positions]), paths, split)
        if task.single_label and result.get("top_losses"):
            worst = rows[[row["position"] for row in result["top_losses"]]]
            _explain_top_losses(run_dir, trained, pictures(worst))
        save_first_feature_maps(run_dir, trained, pictures(rows[:1]))
    if cfg.report and distributed.is_main():
        save_model_summary(run_dir, trained)
    return figures, {name: (splits[name], value) for name, value in outputs.items()}


def _explain_top_losses(run_dir: Path, trained: LoadedModel, images: torch.Tensor) -> None:
    """Grad-CAM of the top losses: where the model looked for the class it predicted."""
    try:
        explain_images(trained, images, None, "gradcam", Path(run_dir) / SALIENCY_PLOT)
    except ImagefitError as error:  # a model without feature maps (ViT): no plot, say why
        warnings.warn(f"no Grad-CAM of the top losses: {error}", ImagefitWarning, stacklevel=2)
        return
    list_saliency(run_dir)


def _prefixed(prefix: str, values: dict) -> dict:
    return {prefix + name: value for name, value in values.items()}


def _store_threshold(run_dir: Path, threshold: float) -> None:
    """The chosen multi-label threshold becomes the model's own (model.json)."""
    path = Path(run_dir) / runs.MODEL_INFO
    if path.is_file():
        info = run_records.read_model_info(run_dir)
        info["task"]["threshold"] = threshold
        runs.save_json(path, info)
