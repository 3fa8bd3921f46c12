"""imagefit: train image models from a folder, a CSV file or arrays, with the practitioner's
recipe built in."""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    FitResult,
    LoadedModel,
    evaluate,
    fit,
    load_model,
    lr_find,
    predict,
    resume,
    show_batch,
)
from .config import EvaluateOptions, FitConfig, PredictOptions  # noqa: E402
from .data.sources import Table, from_arrays, read_source  # noqa: E402
from .errors import FitInterrupted, ImagefitError, ImagefitWarning  # noqa: E402

__all__ = [
    "EvaluateOptions", "FitConfig", "FitInterrupted", "FitResult", "ImagefitError",
    "ImagefitWarning", "LoadedModel", "PredictOptions", "Table", "evaluate", "fit",
    "from_arrays", "load_model", "predict", "lr_find", "read_source", "resume", "show_batch",
]
