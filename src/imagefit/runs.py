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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from .config import Activation, FitConfig, HeadKind, SourceOptions
from .errors import ImagefitError
from .tasks import task_class

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


class _TaskRecord(BaseModel):
    kind: str
    names: list[str] = Field(min_length=1)
    threshold: float = 0.5
    target_mean: list[float] = []
    target_std: list[float] = []

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        task_class(kind)  # an unknown kind is an error, never taken for another
        return kind


class _Normalization(BaseModel):
    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)


class ModelRecord(BaseModel):
    """What model.json must hold for a model to be rebuilt (other keys are kept as they
    are): checked on loading, so an edited or damaged file is one clear line."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    architecture: str = Field(min_length=1)
    head: HeadKind = "timm"
    head_hidden: int | None = Field(None, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    act: Activation | None = None
    task: _TaskRecord
    image_size: int = Field(ge=1, le=8192)
    channels: Literal[1, 3]
    resize: Literal["crop", "squish", "pad"]
    normalization: _Normalization
    weights_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")


class _TextRecord(BaseModel):
    characters: str
    lowercase: bool = True
    length: int = Field(ge=1)


class TextModelRecord(BaseModel):
    """model.json of a text model: its characters and length instead of image settings."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    input: Literal["text"]
    architecture: str = Field(min_length=1)
    task: _TaskRecord
    text: _TextRecord
    weights_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")


class MetricsRecord(BaseModel):
    """What readers of metrics.json rely on (other keys are kept as they are)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    status: str | None = None
    error: str | None = None
    epochs: int | None = Field(None, ge=0)
    seconds: float | None = Field(None, ge=0)
    interrupted: bool | None = None


RunConfigRecord = create_model(  # config.yaml: the options readers use, typed as FitConfig's
    "RunConfigRecord", __config__=ConfigDict(extra="allow"), data=(str | None, None),
    **{name: (FitConfig.model_fields[name].annotation, FitConfig.model_fields[name])
       for name in (*SourceOptions.model_fields, "valid_pct", "stratify", "seed",
                    "augment_options")})


def read_record(path: str | Path, schema: type[BaseModel] | None = None,
                advice: str = RESTORE, missing_ok: bool = False) -> dict | None:
    """The mapping a run or export file holds, checked against ``schema``: one
    ``ImagefitError`` naming the file, what is wrong and ``advice`` when it cannot be read,
    parsed or checked. A missing file is None with ``missing_ok``."""
    path = Path(path)
    if missing_ok and not path.exists():
        return None
    data = parse_record(path, advice)
    if not isinstance(data, dict):
        what = "it is empty" if data is None else \
            f"it holds a {_type_name(data)}, not a mapping of keys to values"
        raise ImagefitError(f"{path} is damaged ({what}): {advice}")
    if schema is not None:
        try:
            schema.model_validate(data)
        except ValidationError as error:
            raise ImagefitError(f"{path} is damaged ({_problem(error)}): {advice}") from None
    return data


def parse_record(path: Path, advice: str = RESTORE) -> Any:
    """What a run or export file holds (YAML or JSON by its suffix; None when empty), or one
    ``ImagefitError`` when it cannot be read or parsed."""
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
    try:
        text = path.read_text()
        parse = yaml.safe_load if kind == "YAML" else json.loads
        return parse(text) if text.strip() else None
    except FileNotFoundError:
        raise ImagefitError(f"{path} not found: {advice}") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise ImagefitError(f"{path} is damaged (not readable {kind}){_parse_error(error)}: "
                            f"{advice}") from None


def _problem(error: ValidationError) -> str:
    """pydantic's first complaint as 'where: what'."""
    problem = error.errors()[0]
    where = ".".join(str(p) for p in problem["loc"]) or "the file"
    return f"{where}: {problem['msg'].lower()}"


def _parse_error(error: BaseException) -> str:
    """Where and why a file did not parse, as ' at line N (why)'."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        return f" at line {error.problem_mark.line + 1} ({error.problem})"
    if isinstance(error, json.JSONDecodeError):
        return f" at line {error.lineno} ({error.msg})"
    return f" ({_first_line(error)})"


def _type_name(value: Any) -> str:
    return {str: "string", list: "list", int: "number", float: "number",
            bool: "true/false value"}.get(type(value), type(value).__name__)


def read_config(run_dir: str | Path, advice: str = RESTORE) -> dict | None:
    """A run's config.yaml, checked; None when the run has none."""
    return read_record(Path(run_dir) / "config.yaml", RunConfigRecord, advice, missing_ok=True)


def read_metrics(run_dir: str | Path) -> dict | None:
    """A run's metrics.json, checked; None when it has none (it has not ended)."""
    return read_record(Path(run_dir) / "metrics.json", MetricsRecord, missing_ok=True)


def read_model_info(run_dir: str | Path) -> dict:
    """model.json of a run directory, checked to describe a model, or a clear error when the
    run holds no model or the file is damaged."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ImagefitError(f"run {run_dir} not found: give a run directory made by imagefit fit")
    if not (run_dir / MODEL_WEIGHTS).is_file() or not (run_dir / MODEL_INFO).is_file():
        raise ImagefitError(
            f"{run_dir} holds no model ({MODEL_WEIGHTS} and {MODEL_INFO}): give a run "
            "directory made by imagefit fit"
        )
    path = run_dir / MODEL_INFO
    return check_model_info(read_record(path), path)


def check_model_info(info: dict, path: Path, advice: str = RESTORE) -> dict:
    """``info`` (model.json's content, or an export's copy of it from ``path``) checked to
    describe a model that can be rebuilt."""
    text = info.get("input") == "text"
    try:
        record = (TextModelRecord if text else ModelRecord).model_validate(info)
    except ValidationError as error:
        raise ImagefitError(f"{path} does not describe a model ({_problem(error)}): "
                            f"{advice}") from None
    if text:
        return info
    channels = record.channels
    norm = record.normalization
    if len(norm.mean) != channels or len(norm.std) != channels:
        raise ImagefitError(f"{path} does not describe a model (normalization has "
                            f"{len(norm.mean)} mean(s) for {channels} channel(s)): {advice}")
    return info


def verify_checksum(path: Path, recorded: str | None, record: str, advice: str) -> None:
    """``path``'s bytes against the sha256 ``record`` holds (files written before imagefit
    recorded one are not checked)."""
    if recorded is None:
        return
    try:
        found = file_sha256(path)
    except OSError as error:
        raise ImagefitError(f"{path} cannot be read ({error.strerror}): {advice}") from None
    if found != recorded:
        raise ImagefitError(f"{path} does not match the checksum in {record}: the file was "
                            f"changed or damaged; {advice}")


def load_weights(model: nn.Module, run_dir: str | Path) -> nn.Module:
    """Fill ``model`` with the run's safetensors weights (no pickle involved); a damaged file,
    weights that do not match model.json's checksum (edited since they were saved), weights
    of another model and non-finite weights are each one clear error."""
    import torch

    path = Path(run_dir) / MODEL_WEIGHTS
    mismatch = None
    try:
        load_safetensors_model(model, path, strict=True)
    except (SafetensorError, OSError) as error:
        raise ImagefitError(f"{path} is damaged ({_first_line(error)}): {RESTORE}") from None
    except RuntimeError as error:
        mismatch = error
    try:
        recorded = read_record(Path(run_dir) / MODEL_INFO).get(WEIGHTS_CHECKSUM)
    except ImagefitError:
        recorded = None  # read_model_info names a damaged model.json
    verify_checksum(path, recorded, MODEL_INFO, "train again or restore it")
    if mismatch is not None:
        raise ImagefitError(f"{path} does not hold the weights model.json describes "
                            f"({_first_line(mismatch)}): the two files come from different "
                            "fits; restore them together from one run")
    if not all(torch.isfinite(t).all() for t in model.state_dict().values()
               if t.is_floating_point()):
        raise ImagefitError(f"{path} holds NaN or infinite weights: its fit diverged; train "
                            "again with a lower --lr")
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


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
