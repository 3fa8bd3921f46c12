"""The explain command: a saliency overlay (or a grid of one layer's feature maps) PNG per
image of files, folders or CSVs of paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import runs
from ..config import ExplainOptions, merge_options
from ..data.cache import build_cache, warn_unreadable
from ..errors import ImagefitError
from ..evaluation.feature_maps import default_feature_layer, module_named
from ..evaluation.inference import expand_inputs, load_model
from ..evaluation.saliency import (
    METHOD_TITLES,
    default_targets,
    describe_outputs,
    gradcam_layer,
    loaded_outputs,
    saliency_maps,
    target_index,
)
from ..report.feature_maps import save_feature_map_grids
from ..report.overlays import save_saliency_overlays


def explain(run: str | Path, inputs: list[str | Path], out: str | Path,
            options: ExplainOptions | None = None, **overrides: Any) -> list[Path]:
    """A saliency overlay PNG (or, with method feature-maps, a grid of one layer's output)
    per readable image of files, folders or CSVs of paths, written to the folder ``out`` as
    STEM_METHOD.png; returns their paths. A folder it made is removed again when it fails."""
    options = merge_options(ExplainOptions, options, overrides)
    with runs.new_output_folder(out, "--out") as folder:
        return _write_maps(run, list(inputs), folder, options)


def _write_maps(run: str | Path, inputs: list[str | Path], out: Path,
                options: ExplainOptions) -> list[Path]:
    loaded = load_model(run, options.device, options.precision)
    if not loaded.input.reads_images:
        raise ImagefitError(f"{run} holds a text model: explain draws maps of images; see its "
                            "report for the top losses and accuracy by text length")
    target = None if options.target is None else target_index(loaded.task, options.target)
    layer = options.layer
    if options.method == "feature-maps":
        layer = layer or default_feature_layer(loaded.model)
        module_named(loaded.model, layer)  # an unknown name fails before any image is read
    elif options.method == "gradcam" and layer is None:
        layer = gradcam_layer(loaded.model, loaded.settings.size, loaded.settings.channels)
    paths = expand_inputs(inputs, options)
    cache = build_cache(paths, loaded.settings, options.cache_dir, progress=options.progress)
    warn_unreadable(cache, paths, "{count} file(s) have no map in the output, the first {first}")
    rows = np.setdiff1d(np.arange(len(paths)), cache.failed)
    names = _file_names([paths[row] for row in rows], options.method)
    written = []
    for start in range(0, len(rows), options.bs):
        chunk = torch.as_tensor(rows[start:start + options.bs])
        images = cache.tensor().index_select(0, chunk).permute(0, 3, 1, 2)
        if options.method == "feature-maps":
            written += save_feature_map_grids(
                loaded, images, [out / name for name in names[start:start + len(chunk)]],
                layer=layer, titles=[Path(paths[row]).name for row in chunk.tolist()])
            continue
        outputs = loaded_outputs(loaded, images)
        targets = (default_targets(loaded.task, outputs) if target is None
                   else torch.full((len(chunk),), target))
        maps = saliency_maps(loaded, images, options.method, targets, layer=layer,
                             batch_size=options.bs)
        titles = describe_outputs(loaded.task, outputs, targets)
        for index in range(len(chunk)):
            written.append(save_saliency_overlays(
                images[index:index + 1], maps[index:index + 1], titles[index:index + 1],
                out / names[start + index], alpha=options.alpha,
                map_title=METHOD_TITLES[options.method]))
    return written


def _file_names(paths: list[str], method: str) -> list[str]:
    """STEM_METHOD.png per path, numbered STEM-2_METHOD.png and on where stems repeat."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem, number = Path(path).stem, 1
        name = f"{stem}_{method}.png"
        while name in used:
            number += 1
            name = f"{stem}-{number}_{method}.png"
        used.add(name)
        names.append(name)
    return names
