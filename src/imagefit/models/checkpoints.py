"""A weights file read (safetensors, or a PyTorch state dict read without unpickling code)
and its tensors paired with a model's: by name (wrapper prefixes stripped), by the
EfficientNet-PyTorch names of the Lite0 package, or by order and shape; the classifier left
as it is when its shape differs (another number of classes)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import ImagefitError

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
SHOWN = 3  # mismatches named in an error message

# EfficientNet-PyTorch (lukemelas) names -> timm EfficientNet names.
LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
             "_bn1": "bn2", "_fc": "classifier"}
LITE0_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1",
                         "_project_conv": "conv_pw", "_bn2": "bn2"}
LITE0_INVERTED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def copy_weights(model: nn.Module, path: Path, source: str) -> dict:
    """Copy the tensors of the weights file ``path`` (named ``source`` in messages) into
    ``model``; what was done: ``method``, ``loaded``, ``skipped``, ``notes``."""
    checkpoint = _read_file(path)
    target = _without_counters(model.state_dict())
    checkpoint = _strip_wrapper_prefixes(_without_counters(checkpoint), target)
    heads = _head_prefixes(model)
    ordered = path.suffix != ".safetensors"  # safetensors files keep tensors sorted by name
    method, pairs, unused_heads = _pair(checkpoint, target, heads, model, source, ordered)
    loaded, skipped, notes = _fit_shapes(checkpoint, target, pairs, heads, source)
    state = model.state_dict()
    state.update(loaded)
    model.load_state_dict(state)
    return {"method": method, "loaded": len(loaded), "skipped": skipped + unused_heads,
            "notes": notes}


def _read_file(path: Path) -> dict[str, Tensor]:
    """The tensors in a safetensors file or a tensor-only torch checkpoint."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise ImagefitError(
                f"cannot read {path} as safetensors ({str(error).splitlines()[0]}): "
                "give an intact .safetensors file"
            ) from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:
            raise _unreadable(path) from None
        raise ImagefitError(
            f"{path} contains the Python object {found.group(1)}, which is never loaded "
            "(only tensors are): save the weights alone with torch.save(model.state_dict(), "
            "path) or as .safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError):
        raise _unreadable(path) from None
    return _state_dict(checkpoint, path)


def _unreadable(path: Path) -> ImagefitError:
    return ImagefitError(
        f"cannot read {path} as a PyTorch state dict (damaged or another format): give a "
        "file saved with torch.save(model.state_dict(), path) or a .safetensors file"
    )


def _state_dict(checkpoint: object, path: Path) -> dict[str, Tensor]:
    """The name-to-tensor mapping in a checkpoint, unwrapped from 'state_dict' or 'model'."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not (isinstance(checkpoint, dict) and checkpoint
            and all(isinstance(v, Tensor) for v in checkpoint.values())):
        raise ImagefitError(
            f"{path} holds no state dict (a mapping of names to tensors): save one with "
            "torch.save(model.state_dict(), path)"
        )
    return dict(checkpoint)


def _without_counters(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state without integer scalars (BatchNorm's batch counters), which are no weights."""
    return {k: v for k, v in state.items() if v.dim() > 0 or v.is_floating_point()}


def _strip_wrapper_prefixes(checkpoint: dict[str, Tensor],
                            target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop prefixes such as 'module.' that all checkpoint names share but the model's lack."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if checkpoint and all(k.startswith(prefix) for k in checkpoint) and not all(
                    k.startswith(prefix) for k in target):
                checkpoint = {k.removeprefix(prefix): v for k, v in checkpoint.items()}
                stripped = True
    return checkpoint


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the model's classifier, from timm's pretrained_cfg."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else names
    return tuple(f"{name}." for name in names)


def _pair(checkpoint: dict[str, Tensor], target: dict[str, Tensor], heads: tuple[str, ...],
          model: nn.Module, source: str,
          ordered: bool) -> tuple[str, dict[str, str], list[str]]:
    """Match model tensor names to checkpoint names; by order only if ``ordered``.

    Returns the method, the pairs (model name -> checkpoint name) and the classifier names
    of the checkpoint that the model lacks.
    """
    candidates = [("names", {k: k for k in checkpoint})]
    lite0 = _lite0_names(checkpoint, model)
    if lite0 is not None:
        candidates.append(("efficientnet-lite0 names", lite0))
    body = {k for k in target if not k.startswith(heads)}
    for method, renamed in candidates:
        if {k for k in renamed if not k.startswith(heads)} == body:
            pairs = {k: renamed[k] for k in target if k in renamed}
            return method, pairs, sorted(k for k in renamed if k not in target)
    if ordered and len(checkpoint) == len(target):
        return "order and shape", dict(zip(target, checkpoint)), []
    renamed = max((r for _, r in candidates), key=lambda r: len(body & r.keys()))
    missing = sorted(body - renamed.keys())
    extra = sorted(k for k in renamed if k not in target and not k.startswith(heads))
    no_order = (f"matching by order needs as many tensors ({len(checkpoint)} against the "
                f"model's {len(target)})" if ordered else
                "matching by order needs a .pt/.pth file (safetensors keeps no tensor order)")
    raise ImagefitError(
        f"weights {source} do not fit this model: {len(missing)} tensor(s) missing "
        f"({_some(missing)}), {len(extra)} unexpected ({_some(extra)}); {no_order}: "
        "give weights of the same architecture"
    )


def _lite0_names(checkpoint: dict[str, Tensor], model: nn.Module) -> dict[str, str] | None:
    """EfficientNet-PyTorch names renamed to timm's (new name -> old), or None if not such."""
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        return None
    layout = [(s, j) for s, stage in enumerate(stages) for j in range(len(stage))]
    expanded = {k.split(".")[1] for k in checkpoint
                if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed = {}
    for key in checkpoint:
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 3 and parts[1].isdigit():
            rules = LITE0_INVERTED_BLOCK if parts[1] in expanded else LITE0_SEPARABLE_BLOCK
            if int(parts[1]) >= len(layout) or parts[2] not in rules:
                return None
            stage, index = layout[int(parts[1])]
            new = [f"blocks.{stage}.{index}.{rules[parts[2]]}", *parts[3:]]
        elif parts[0] in LITE0_TOP:
            new = [LITE0_TOP[parts[0]], *parts[1:]]
        else:
            return None
        renamed[".".join(new)] = key
    return renamed


def _fit_shapes(checkpoint: dict[str, Tensor], target: dict[str, Tensor],
                pairs: dict[str, str], heads: tuple[str, ...],
                source: str) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """The tensors to load, the classifier names skipped and notes; raise on other mismatches."""
    stem = next((k for k, v in target.items() if v.dim() == 4), None)
    loaded, skipped, notes, mismatched = {}, [], [], []
    for name, old in pairs.items():
        tensor, wanted = checkpoint[old], target[name].shape
        if name == stem and wanted[1] == 1 and tensor.dim() == 4 and tensor.shape[1] == 3:
            summed = tensor.sum(dim=1, keepdim=True)
            if summed.shape == wanted:
                tensor = summed
                notes.append(f"{name}: the weights' 3 input channels summed into 1")
        if tensor.shape == wanted:
            loaded[name] = tensor
        elif name.startswith(heads):
            skipped.append(name)
        else:
            where = "" if old == name else f" (as {old})"
            mismatched.append(f"{name}{where} {tuple(tensor.shape)} in the weights, "
                              f"{tuple(wanted)} in the model")
    if mismatched:
        raise ImagefitError(
            f"weights {source} do not fit this model: {len(mismatched)} tensor(s) differ in "
            f"shape: {_some(mismatched)}: give weights of the same architecture and input "
            "channels"
        )
    return loaded, skipped, notes


def _some(names: list[str]) -> str:
    """The first few names, and how many more."""
    shown = "; ".join(names[:SHOWN]) or "none"
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
