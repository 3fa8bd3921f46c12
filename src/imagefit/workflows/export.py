"""The export command: a run's model to ONNX, checked on images of the run's own data."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import run_records, runs
from ..config import ExportOptions, SourceOptions, merge_options
from ..data.prepare import prepare_images
from ..data.sources import read_source
from ..data.splits import assign_validation
from ..errors import ImagefitError, ImagefitWarning
from ..evaluation.export import export_onnx
from ..evaluation.inference import LoadedModel, load_models
from ..evaluation.onnx_model import require_onnx


def export(run: str | Path, out: str | Path | None = None, options: ExportOptions | None = None,
           **overrides: Any) -> dict:
    """Export the model of ``run`` to ``out`` (default RUN/model.onnx) with ``out``.json
    beside it; returns the description written, with the parity found. A CV directory's fold
    models become one graph that averages them, as ``predict CV_DIR`` does."""
    options = merge_options(ExportOptions, options, overrides)
    require_onnx()
    run = Path(run)
    members = [member for _, member in load_models(run, "cpu", precision="fp32")]
    loaded = members[0]
    if len(members) > 1 and not loaded.input.reads_images:
        raise ImagefitError(f"{run} holds text models whose folds read different characters: "
                            "export one fold's run directory (e.g. fold_0)")
    out = runs.output_file(out or run / "model.onnx", "--out", "model.onnx")
    samples = parity_samples(run, loaded, options)
    description = export_onnx(members, Path(out), samples, opset=options.opset,
                              dynamic_batch=options.dynamic_batch, source=str(run))
    description["file"] = str(out)
    return description


def parity_samples(run: Path, loaded: LoadedModel, options: ExportOptions) -> torch.Tensor:
    """Up to ``parity_images`` inputs from the run's data, validation rows first (carved as
    the run carved them), as the graph takes them; random ones, with a warning, when the
    data cannot be read again (in-memory tables, moved files)."""
    values = run_records.read_config(run, "restore it from a copy of the run, or export another "
                              "run") or {}
    data = values.get("data")
    try:
        if not data:
            raise ImagefitError("it was trained on an in-memory table")
        source = SourceOptions.model_validate({k: v for k, v in values.items()
                                               if k in SourceOptions.model_fields})
        source.cache_dir, source.progress = options.cache_dir, options.progress
        table = assign_validation(read_source(data, source), values.get("valid_pct", 0.2),
                                  values.get("seed", 0), values.get("stratify", True))
        rows = np.concatenate([np.flatnonzero(table.split == s) for s in ("valid", "train")])
        table = table.subset(rows[:options.parity_images])
        if not loaded.input.reads_images:
            return loaded.input.encode(table.texts)
        prepared = prepare_images(table, loaded.settings, cache_dir=options.cache_dir,
                                  progress=options.progress)
        usable = torch.as_tensor(np.flatnonzero(prepared.usable))
        return prepared.cache.tensor().index_select(0, usable).permute(0, 3, 1, 2).contiguous()
    except ImagefitError as error:
        warnings.warn(f"the parity check uses random inputs: {run}'s data cannot be read "
                      f"({error})", ImagefitWarning, stacklevel=3)
    generator = torch.Generator().manual_seed(0)
    return loaded.input.random_inputs(options.parity_images, generator)
