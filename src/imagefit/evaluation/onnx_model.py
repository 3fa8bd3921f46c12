"""An exported model run by onnxruntime: its description (FILE.json, or the graph's
metadata) and ``OnnxModel``, which ``predict`` calls as it calls a run's model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import runs
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


def read_description(path: Path) -> dict:
    """An exported model's description: FILE.json beside it, else the graph's metadata."""
    path = Path(path)
    if not path.is_file():
        raise ImagefitError(f"{path} not found: give a file written by imagefit export")
    beside = Path(f"{path}.json")
    if beside.is_file():
        return runs.load_json(beside)
    onnx, _ = require_onnx()
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx's parse errors come in several kinds
        raise ImagefitError(f"{path} is not a readable ONNX file ({type(error).__name__}): "
                            "export the run again") from None
    found = {entry.key: entry.value for entry in graph.metadata_props}
    if "imagefit" not in found:
        raise ImagefitError(f"{path} was not written by imagefit export (no imagefit "
                            "metadata): export a run with imagefit export")
    return json.loads(found["imagefit"])


class OnnxModel:
    """An exported model run by onnxruntime on the CPU: batches as the cache holds them in,
    the task's probabilities or values out."""

    def __init__(self, path: Path) -> None:
        _, onnxruntime = require_onnx()
        self.description = read_description(path)
        self.session = onnxruntime.InferenceSession(str(path),
                                                    providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.fixed_batch = self.description["input"]["shape"][0] == 1

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.contiguous().numpy()
        if self.fixed_batch:
            parts = [self.session.run(None, {self.input: array[i:i + 1]})[0]
                     for i in range(len(array))]
            return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0)
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])
