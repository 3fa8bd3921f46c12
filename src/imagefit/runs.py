"""Run directories: paths, atomic writes, and saving and loading of config, metrics and
weights. A model is ``model.safetensors`` + ``model.json``; loading never unpickles code."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from .errors import ImagefitError

MODEL_WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh ``root/<YYYY-MM-DD_HH-MM-SS>_<name>`` directory (suffixed if taken)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        path = root / (f"{stamp}_{slug}" + (f"_{attempt}" if attempt else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ImagefitError(f"cannot create a run directory in {root}: too many runs this second")


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C back until the block ends, so files written together stay consistent."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    os.replace(temporary, path)


def save_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=_plain) + "\n")


def save_yaml(path: Path, data: dict) -> None:
    write_atomic(path, yaml.safe_dump(json.loads(json.dumps(data, default=_plain)),
                                      sort_keys=False))


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__}")


def append_metrics_row(run_dir: Path, row: dict) -> None:
    """One row of metrics.csv per epoch; the header is written with the first row."""
    path = Path(run_dir) / "metrics.csv"
    new = not path.exists()
    with open(path, "a", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def save_model(run_dir: Path, model: nn.Module, info: dict) -> None:
    """Weights to model.safetensors and the description to model.json, each atomically."""
    run_dir = Path(run_dir)
    handle, temporary = tempfile.mkstemp(dir=run_dir, prefix=".model.", suffix=".safetensors")
    os.close(handle)
    save_safetensors_model(_unwrapped(model), temporary)
    os.replace(temporary, run_dir / MODEL_WEIGHTS)
    save_json(run_dir / MODEL_INFO, info)


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", getattr(model, "module", model))


def read_model_info(run_dir: str | Path) -> dict:
    """model.json of a run directory, or a clear error when it holds no model."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ImagefitError(f"run {run_dir} not found: give a run directory made by imagefit fit")
    if not (run_dir / MODEL_WEIGHTS).is_file() or not (run_dir / MODEL_INFO).is_file():
        raise ImagefitError(
            f"{run_dir} holds no model ({MODEL_WEIGHTS} and {MODEL_INFO}): give a run "
            "directory made by imagefit fit"
        )
    return json.loads((run_dir / MODEL_INFO).read_text())


def load_weights(model: nn.Module, run_dir: str | Path) -> nn.Module:
    """Fill ``model`` with the run's safetensors weights (no pickle involved)."""
    load_safetensors_model(model, Path(run_dir) / MODEL_WEIGHTS, strict=True)
    return model


CHECKPOINT = "checkpoints/last.pt"


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """The training state (model, optimizer, schedule position, random state, history),
    written atomically with torch.save."""
    import torch

    path = Path(run_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".last.")
    with os.fdopen(handle, "wb") as out:
        torch.save(state, out)
    os.replace(temporary, path)


def load_checkpoint(run_dir: Path) -> dict:
    """The last training checkpoint of a run, read with weights_only=True (no code runs)."""
    import torch

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ImagefitError(
            f"{run_dir} has no training checkpoint ({CHECKPOINT}): it finished no epoch, or "
            "was not made by imagefit fit; start a new fit"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def write_metrics_rows(run_dir: Path, rows: list[dict]) -> None:
    """metrics.csv rewritten with exactly ``rows`` (on resuming, the checkpoint's epochs)."""
    path = Path(run_dir) / "metrics.csv"
    path.unlink(missing_ok=True)
    for row in rows:
        append_metrics_row(run_dir, row)


def save_steps(run_dir: Path, step_log: list[dict]) -> None:
    """steps.csv: the learning rate, momentum and training loss of every step."""
    rows = ["step,lr,momentum,loss"]
    for row in step_log:
        momentum = "" if row.get("momentum") is None else f"{row['momentum']:.6g}"
        loss = f"{float(row['loss']):.6g}" if "loss" in row else ""
        rows.append(f"{row['step']},{row['lr']:.6g},{momentum},{loss}")
    write_atomic(Path(run_dir) / "steps.csv", "\n".join(rows) + "\n")


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
