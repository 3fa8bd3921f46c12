"""imagefit: train image models from a folder, a CSV file or arrays, with the practitioner's
recipe built in.

The public names load their modules on first use (PEP 562), so ``import imagefit`` and the
command line's help, option errors and listings do not pay for torch.
"""

from importlib import import_module

from .errors import FitInterrupted, ImagefitError, ImagefitWarning
from .version import __version__

_PUBLIC = {
    "CVResult": "api", "FitResult": "api", "cv": "api", "evaluate": "api", "explain": "api",
    "fit": "api", "load_model": "api", "lr_find": "api", "predict": "api", "resume": "api",
    "show_batch": "api", "SweepResult": "api", "sweep": "api", "check": "api",
    "CheckResult": "api", "CheckConfig": "config", "label_issues": "api",
    "EvaluateOptions": "config", "FitConfig": "config", "PredictOptions": "config",
    "Table": "data.table", "from_arrays": "data.table", "read_source": "data.sources",
    "LoadedModel": "evaluation.inference",
}

__all__ = [
    "CVResult", "CheckConfig", "CheckResult", "EvaluateOptions", "FitConfig", "FitInterrupted",
    "FitResult", "ImagefitError", "ImagefitWarning", "LoadedModel", "PredictOptions",
    "SweepResult", "Table", "__version__", "check", "cv", "evaluate", "explain", "fit",
    "from_arrays", "label_issues", "load_model", "lr_find", "predict", "read_source",
    "resume", "show_batch", "sweep",
]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'imagefit' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
