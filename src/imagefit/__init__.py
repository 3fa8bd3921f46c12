"""imagefit: train image models from a folder, a CSV file or arrays, with the practitioner's
recipe built in.

The public names load their modules on first use (PEP 562), so ``import imagefit`` and the
command line's help, option errors and listings do not pay for torch.
"""

from importlib import import_module

from .errors import FitInterrupted, ImagefitError, ImagefitWarning
from .surface import API, ELSEWHERE
from .version import __version__

# every public name and the module that holds it, from the one list (surface.py)
_PUBLIC = {**dict.fromkeys(API, "api"), **ELSEWHERE}

__all__ = sorted([*_PUBLIC, "FitInterrupted", "ImagefitError", "ImagefitWarning",
                  "__version__"])


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'imagefit' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
