"""What a run directory's files must hold to be read back (model.json, metrics.json,
config.yaml), checked on reading so that an edited or damaged file is one clear line, and a
model's weights loaded from safetensors (no code unpickled) against model.json's checksum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from torch import nn

from .config import Activation, FitConfig, HeadKind, SourceOptions
from .errors import ImagefitError
from .runs import MODEL_INFO, MODEL_WEIGHTS, RESTORE, WEIGHTS_CHECKSUM, file_sha256
from .tasks import task_class


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
