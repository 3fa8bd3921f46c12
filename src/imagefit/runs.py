"""Run directories: paths, atomic writes, and saving and loading of config, metrics and
weights. A model is ``model.safetensors`` + ``model.json``; loading never unpickles code."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from .errors import ImagefitError

MODEL_WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"
MODEL_SUMMARY = "model_summary.txt"  # torchinfo's table of the model, for report.html
WEIGHTS_CHECKSUM = "weights_sha256"  # model.json's record of model.safetensors's bytes
RESTORE = "restore it from a copy of the run, or train the model again"


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh ``root/<YYYY-MM-DD_HH-MM-SS>_<name>`` directory (suffixed if taken)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:80] or "run"
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root = output_folder(root, "--runs-dir")
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
    """Write through a temporary file and rename, so a crash never leaves half a file (nor
    the temporary one)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def output_file(path: str | Path, option: str, example: str = "out.csv") -> Path:
    """``path`` checked before any work as a file a command may write (its folder is made):
    not a folder (``example`` names a file of the kind it writes), not inside a file."""
    path = Path(path)
    if path.is_dir():
        raise ImagefitError(f"{option} {path} is a folder: give a file name, e.g. "
                            f"{path / example}")
    _make_folder(path.parent, option, path)
    return path


def output_folder(path: str | Path, option: str, create: bool = True) -> Path:
    """``path`` made (with its parents) as a folder a command writes into; ``create=False``
    only checks that it can be (a check before long work that must leave nothing behind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ImagefitError(f"{option} {path} is a file: give a folder")
    blocking = next((parent for parent in path.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ImagefitError(f"{option} {path}: {blocking} is a file, not a folder: give "
                            "another path")
    if create:
        _make_folder(path, option, path)
    return path


@contextmanager
def new_output_folder(path: str | Path, option: str) -> Iterator[Path]:
    """``output_folder`` for the block, removed again with the parents it made when the
    block fails, so that a failed command leaves no folder behind."""
    path = Path(path)
    made = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    folder = output_folder(path, option)
    try:
        yield folder
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def _make_folder(folder: Path, option: str, given: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ImagefitError(f"{option} {given}: {folder} is a file, not a folder: give "
                            "another path") from None
    except OSError as error:
        raise ImagefitError(f"{option} {given}: cannot create {folder} ({error.strerror}): "
                            "give a writable path") from None


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
    """Weights to model.safetensors and the description to model.json, each atomically;
    model.json records the weights' sha256, so that edited or damaged weights are named."""
    run_dir = Path(run_dir)
    handle, temporary = tempfile.mkstemp(dir=run_dir, prefix=".model.", suffix=".safetensors")
    os.close(handle)
    save_safetensors_model(_unwrapped(model), temporary)
    checksum = file_sha256(Path(temporary))
    os.replace(temporary, run_dir / MODEL_WEIGHTS)
    save_json(run_dir / MODEL_INFO, {**info, WEIGHTS_CHECKSUM: checksum})


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", getattr(model, "module", model))


LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run directory while a fit writes it, so that a live run
    cannot be resumed or written by a second process. The operating system drops the lock
    when its process ends, however it ends (kill -9 included), so a stale lock never blocks
    a resume; the file holds the owner's pid and command for the message."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.handle = None

    def __enter__(self) -> RunLock:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ImagefitError(
                f"{self.path.parent} is being written by {owner}: wait for that fit to end, "
                "or stop it, before resuming or writing this run") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({' '.join(sys.argv[:4])[:200]})\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the lock
            self.handle = None


def lock_held(path: str | Path, exclusive: bool = True) -> bool:
    """Whether another process holds a lock on the file ``path`` (an exclusive one, or with
    ``exclusive``, any): tried without waiting, and let go at once."""
    try:
        with open(path) as handle:
            fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no such file: nobody holds it
        return False
    return False


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process is writing the run directory (holds its lock)."""
    return lock_held(Path(run_dir) / LOCK, exclusive=False)


def remove_partial_files(run_dir: Path) -> list[str]:
    """The temporary files an atomic write leaves when its process is killed mid-write
    (``.NAME.*`` beside NAME); removed when the run is taken up again. Returns their names."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for path in folder.glob(".*"):
            if path.is_file() and path.name != LOCK:
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


def remove_run_dir(run_dir: Path) -> None:
    """Delete a run directory that holds nothing worth keeping (no finished epoch)."""
    shutil.rmtree(run_dir, ignore_errors=True)


CHECKPOINT = "checkpoints/last.pt"
CHECKPOINT_KEYS = {"model", "optimizer", "history", "phase", "phase_ends", "epoch_in_phase",
                   "torch_rng", "step_log", "lr_factor", "train_seconds", "train_images"}


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


def require_checkpoint(run_dir: Path) -> Path:
    """The path of a run's training checkpoint, or an error saying there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ImagefitError(
            f"{run_dir} has no training checkpoint ({CHECKPOINT}): it finished no epoch, or "
            "was not made by imagefit fit; start a new fit"
        )
    return path


def load_checkpoint(run_dir: Path) -> dict:
    """The last training checkpoint of a run, read with weights_only=True (no code runs)."""
    import torch

    path = require_checkpoint(run_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds; none is the user's to read
        # torch's own message suggests weights_only=False, which would run pickled code
        reason = "it holds Python objects, which are never unpickled" if isinstance(
            error, pickle.UnpicklingError) else f"{type(error).__name__}"
        raise ImagefitError(f"{path} is not a training checkpoint imagefit can read ({reason}):"
                            " it cannot be resumed; the run's model.safetensors still holds its"
                            " last finished epoch, or start a new fit") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise ImagefitError(f"{path} is not a training checkpoint of imagefit (keys missing): "
                            "it cannot be resumed; start a new fit")
    return state


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
