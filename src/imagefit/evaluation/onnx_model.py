"""An exported model run by onnxruntime: its description (FILE.json, or the graph's
metadata) and ``OnnxModel``, which ``predict`` calls as it calls a run's model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import run_records
from ..errors import ImagefitError

MISSING = ("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'imagefit[export]' "
           "(or pip install onnx onnxscript onnxruntime)")


def require_onnx():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  torch's exporter writes the graph with it
    except ImportError:
        raise ImagefitError(MISSING) from None
    return onnx, onnxruntime


EXPORT_AGAIN = "export the run again"
ONNX_CHECKSUM = "onnx_sha256"  # FILE.json's record of FILE's bytes


class _InputRecord(BaseModel):
    name: str
    dtype: Literal["uint8", "int64"]
    shape: list[int | str] = Field(min_length=2)


class ExportRecord(BaseModel):
    """What an exported model's description must hold for ``predict`` and ``serve`` to run
    it (other keys are kept as they are); its ``model`` is checked as model.json is."""

    model_config = ConfigDict(extra="allow")

    input: _InputRecord
    model: dict
    members: int = Field(1, ge=1)
    source: str = ""
    onnx_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")


def read_description(path: Path) -> dict:
    """An exported model's description: FILE.json beside it (which also holds FILE's
    checksum, verified here), else the graph's metadata; checked either way."""
    path = Path(path)
    if not path.is_file():
        raise ImagefitError(f"{path} not found: give a file written by imagefit export")
    beside = Path(f"{path}.json")
    if beside.is_file():
        description = run_records.read_record(beside, ExportRecord, EXPORT_AGAIN)
        run_records.verify_checksum(path, description.get(ONNX_CHECKSUM), beside.name, EXPORT_AGAIN)
        where = beside
    else:
        where = path
        description = _graph_description(path)
    run_records.check_model_info(description["model"], where, EXPORT_AGAIN)
    return description


def _graph_description(path: Path) -> dict:
    """The description export wrote into the graph's metadata."""
    onnx, _ = require_onnx()
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx's parse errors come in several kinds
        raise ImagefitError(f"{path} is not a readable ONNX file ({type(error).__name__}): "
                            f"{EXPORT_AGAIN}") from None
    found = {entry.key: entry.value for entry in graph.metadata_props}
    if "imagefit" not in found:
        raise ImagefitError(f"{path} was not written by imagefit export (no imagefit "
                            "metadata): export a run with imagefit export")
    try:
        ExportRecord.model_validate_json(found["imagefit"])
    except ValidationError as error:
        raise ImagefitError(f"{path}'s imagefit metadata is damaged "
                            f"({error.errors()[0]['msg'].lower()}): {EXPORT_AGAIN}") from None
    return json.loads(found["imagefit"])


class OnnxModel:
    """An exported model run by onnxruntime on the CPU: batches as the cache holds them in,
    the task's probabilities or values out."""

    def __init__(self, path: Path) -> None:
        _, onnxruntime = require_onnx()
        self.description = read_description(path)
        try:
            self.session = onnxruntime.InferenceSession(str(path),
                                                        providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's load errors (InvalidProtobuf, Fail, ...)
            raise ImagefitError(f"{path} is not a readable ONNX file ({type(error).__name__}"
                                f"): {EXPORT_AGAIN}") from None
        self.input = self.session.get_inputs()[0].name
        self.fixed_batch = self.description["input"]["shape"][0] == 1

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.contiguous().numpy()
        if self.fixed_batch:
            parts = [self.session.run(None, {self.input: array[i:i + 1]})[0]
                     for i in range(len(array))]
            return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0)
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])
