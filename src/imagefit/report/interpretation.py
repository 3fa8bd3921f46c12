"""The interpretation's files: the plots and tables of the validation split (the test split
when there is none), the feature maps of its first image, and the tensors they are drawn
from, so that ``imagefit report`` redraws every plot without the data."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import run_records, runs
from ..errors import ImagefitError, ImagefitWarning
from ..evaluation.feature_maps import default_feature_layer
from ..evaluation.inference import LoadedModel, load_model
from ..tasks import Task
from .feature_maps import save_feature_map_grids
from .interpret import interpret, top_losses
from .overlays import explain_images

INTERPRETATION = "interpretation.json"
INTERPRETATION_TENSORS = "interpretation.safetensors"
TOP_LOSSES = 16
SALIENCY_PLOT = "plots/top_losses_gradcam.png"
FEATURE_MAPS_PLOT = "plots/feature_maps.png"


def list_saliency(run_dir: Path) -> None:
    """Add the top losses' Grad-CAM to the interpretation's plots when it was drawn."""
    path = Path(run_dir) / INTERPRETATION
    if not (Path(run_dir) / SALIENCY_PLOT).is_file() or not path.is_file():
        return
    result = runs.load_json(path)
    if all(plot["file"] != SALIENCY_PLOT for plot in result["plots"]):
        result["plots"].append({"name": "saliency", "file": SALIENCY_PLOT,
                                "title": "Grad-CAM of the top losses (the predicted class)"})
        runs.save_json(path, result)


def save_first_feature_maps(run_dir: Path, loaded: LoadedModel, image: torch.Tensor) -> None:
    """The feature maps of the interpreted split's first image (uint8, 1 x C x H x W) at the
    model's first feature block, listed in the interpretation for the report (one forward
    pass); a model without feature maps gets a warning instead."""
    path = Path(run_dir) / INTERPRETATION
    result = runs.load_json(path)
    split = result.get("split", "valid")
    split = "validation" if split == "valid" else split
    try:
        layer = default_feature_layer(loaded.model)
        save_feature_map_grids(loaded, image, [Path(run_dir) / FEATURE_MAPS_PLOT], layer=layer,
                               titles=[f"first {split} image"])
    except ImagefitError as error:
        warnings.warn(f"no feature maps in the report: {error}", ImagefitWarning, stacklevel=2)
        return
    result["feature_maps"] = {"file": FEATURE_MAPS_PLOT, "layer": layer,
                              "title": f"Each channel of {layer}'s output for the first "
                                       f"{split} image"}
    runs.save_json(path, result)


def save_interpretation(run_dir: Path, task: Task, outputs: torch.Tensor,
                        targets: torch.Tensor, images_for, paths, split: str) -> dict:
    """Interpretation plots and tables, and the tensors to redraw them without the data."""
    worst = top_losses(task, outputs, targets, TOP_LOSSES)
    top_images = images_for(worst) if len(worst) else torch.zeros(0, dtype=torch.uint8)
    save_file({"outputs": outputs.float().contiguous(),
               "targets": targets.float().contiguous(),
               "top_positions": torch.as_tensor(worst, dtype=torch.int64),
               "top_images": top_images.contiguous(),
               "first_image": images_for(np.arange(1)).contiguous()},
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
    task = Task.from_dict(run_records.read_model_info(run_dir)["task"])
    previous = run_records.read_record(run_dir / INTERPRETATION, missing_ok=True) or {}
    targets = tensors["targets"]
    if task.single_label:
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
    try:
        loaded = load_model(run_dir, "cpu")
    except ImagefitError as error:
        warnings.warn(f"no Grad-CAM or feature maps in the report: {error}", ImagefitWarning,
                      stacklevel=2)
        return result
    if task.single_label and len(worst):
        order = [row["position"] for row in result["top_losses"]]
        images = _lookup(worst, tensors["top_images"])(np.asarray(order))
        try:
            explain_images(loaded, images, None, "gradcam", run_dir / SALIENCY_PLOT)
        except ImagefitError as error:
            warnings.warn(f"no Grad-CAM of the top losses: {error}", ImagefitWarning,
                          stacklevel=2)
    list_saliency(run_dir)
    if "first_image" in tensors:  # runs written before the feature maps have none
        save_first_feature_maps(run_dir, loaded, tensors["first_image"])
    return runs.load_json(run_dir / INTERPRETATION)


def _lookup(positions: np.ndarray, images: torch.Tensor):
    """images_for() over the saved top-loss images."""
    index = {int(p): i for i, p in enumerate(np.asarray(positions).tolist())}

    def images_for(wanted: np.ndarray) -> torch.Tensor:
        return images[[index[int(p)] for p in np.asarray(wanted).tolist()]]

    return images_for
