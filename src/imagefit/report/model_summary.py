"""The run's model summary for report.html's config section: torchinfo's table (layer,
output shape, parameters, multiply-adds; ``imagefit[zoo]``) of the trained model at its
image size and channels, saved beside the run's files so that the page needs no model."""

from __future__ import annotations

import warnings
from pathlib import Path

from .. import runs
from ..errors import ImagefitError, ImagefitWarning
from ..evaluation.inference import LoadedModel, load_model
from ..evaluation.saliency import evaluating
from ..models.zoo import summary_table, text_summary_table


def save_model_summary(run_dir: str | Path, loaded: LoadedModel | None = None) -> Path | None:
    """``runs.MODEL_SUMMARY`` of ``loaded`` (default: the run's saved model); None, and no
    file, without torchinfo (the page then says how to install it) or when torchinfo cannot
    count this model (a warning says why). The model is left in the modes it was in."""
    path = Path(run_dir) / runs.MODEL_SUMMARY
    path.unlink(missing_ok=True)  # never a stale table of another model
    loaded = loaded or load_model(run_dir, "cpu", "fp32")
    try:
        with evaluating(loaded.model):
            shape = loaded.input
            table = (summary_table(loaded.model, shape.settings.size, shape.settings.channels)
                     if shape.reads_images else text_summary_table(loaded.model, shape.length))
    except ImagefitError:  # torchinfo is not installed
        return None
    except RuntimeError as error:  # torchinfo's own failures, e.g. on a model's custom layer
        warnings.warn(f"no model summary in the report: {error}".splitlines()[0],
                      ImagefitWarning, stacklevel=2)
        return None
    runs.write_atomic(path, table + "\n")
    return path
