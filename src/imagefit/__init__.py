"""imagefit: train image models from a folder, a CSV file or arrays, with the practitioner's
recipe built in."""

__version__ = "0.1.0"

from .api import FitResult, fit, lr_find, resume, show_batch  # noqa: E402
from .config import EvaluateOptions, FitConfig, PredictOptions  # noqa: E402
from .data.sources import Table, from_arrays, read_source  # noqa: E402
from .errors import FitInterrupted, ImagefitError, ImagefitWarning  # noqa: E402
from .inference import LoadedModel, evaluate, load_model, predict  # noqa: E402

__all__ = [
    "EvaluateOptions", "FitConfig", "FitInterrupted", "FitResult", "ImagefitError",
    "ImagefitWarning", "LoadedModel", "PredictOptions", "Table", "evaluate", "fit",
    "from_arrays", "load_model", "predict", "lr_find", "read_source", "resume", "show_batch",
]
