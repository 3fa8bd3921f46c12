"""ONNX export of a trained model: the graph takes what the cache holds (uint8 images N x C x S
x S at the model's size, or a text model's character indices) and gives what ``predict``
reports (class probabilities, label probabilities, or values in the targets' units), with the
normalization inside; how to bring an image to that size (the resize policy) and the rest of
model.json go in the graph's metadata and in a JSON file beside it, which also holds the file's
sha256 (checked when it is loaded). Each export is checked against PyTorch on real images: a
probability (or value) that differs by more than ``PARITY_LIMIT`` is an error."""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import runs
from ..errors import ImagefitError
from ..version import __version__
from .inference import LoadedModel
from .onnx_model import ONNX_CHECKSUM, require_onnx

PARITY_LIMIT = 1e-4
DEFAULT_OPSET = 18


class Exported(nn.Module):
    """The trained model between its own input pipeline and its task's activation."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = loaded.model
        self.pipeline = loaded.pipeline
        self.task = loaded.task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task.activate(self.model(self.pipeline(x)).float())


def input_spec(loaded: LoadedModel) -> dict:
    """What the graph takes: its name, type and shape ('batch' when any batch size goes)."""
    return loaded.input.graph_input()


class Ensemble(nn.Module):
    """The average of fold models' probabilities (values for regression), as ``predict``
    averages a CV directory's models: one graph for the whole ensemble."""

    def __init__(self, members: list[LoadedModel]) -> None:
        super().__init__()
        self.members = nn.ModuleList(Exported(member) for member in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def export_onnx(loaded: LoadedModel | list[LoadedModel], out: Path, samples: torch.Tensor, *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                source: str = "") -> dict:
    """Write ``out`` (ONNX) and ``out``.json; check onnxruntime's outputs on ``samples``
    against PyTorch's; returns the description written (with the parity found). A list of
    models (a CV's folds, seeing images alike) becomes one graph that averages them."""
    onnx, onnxruntime = require_onnx()
    members = loaded if isinstance(loaded, list) else [loaded]
    loaded = members[0]
    # loaded on the CPU in fp32
    model = (Exported(loaded) if len(members) == 1 else Ensemble(members)).eval()
    spec = input_spec(loaded)
    example = samples[:2] if dynamic_batch else samples[:1]
    started = time.perf_counter()
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        try:
            torch.onnx.export(model, (example,), str(out), dynamo=True, opset_version=opset,
                              input_names=[spec["name"]], output_names=["outputs"],
                              dynamic_shapes=shapes, external_data=False)
        except Exception as error:  # the exporter's many kinds of failure, as one line
            raise ImagefitError(f"{loaded.info['architecture']} could not be exported to "
                                f"ONNX ({type(error).__name__}: "
                                f"{str(error).strip().splitlines()[0][:200]})") from None
    if not dynamic_batch:
        spec["shape"][0] = 1
    description = {
        "imagefit_version": __version__, "source": source, "format": "onnx", "opset": opset,
        "input": spec,
        "output": {"name": "outputs", "means": loaded.task.output_meaning()},
        "resize": loaded.input.resize,
        "model": {k: v for k, v in loaded.info.items() if k != "lighting"},
        "members": len(members),
        "seconds": round(time.perf_counter() - started, 2),
    }
    description["parity"] = parity(model, out, samples, onnxruntime, dynamic_batch)
    graph = onnx.load(str(out))
    entry = graph.metadata_props.add()
    entry.key, entry.value = "imagefit", json.dumps(description)
    onnx.save(graph, str(out))
    description[ONNX_CHECKSUM] = runs.file_sha256(Path(out))  # the graph cannot hold its own
    runs.save_json(Path(f"{out}.json"), description)
    if description["parity"]["max_abs_diff"] > PARITY_LIMIT:
        raise ImagefitError(
            f"{out}: onnxruntime's outputs differ from PyTorch's by up to "
            f"{description['parity']['max_abs_diff']:.2e} (limit {PARITY_LIMIT:g}) on "
            f"{description['parity']['inputs']} inputs: the export is not faithful; try "
            "another --opset, and report the model")
    return description


def parity(model: nn.Module, path: Path, samples: torch.Tensor, onnxruntime,
           dynamic_batch: bool) -> dict:
    """The largest absolute difference between PyTorch's and onnxruntime's outputs."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with torch.no_grad():
        expected = model(samples).numpy()
    if dynamic_batch:
        found = session.run(None, {name: samples.numpy()})[0]
    else:
        found = np.concatenate([session.run(None, {name: samples[i:i + 1].numpy()})[0]
                                for i in range(len(samples))])
    return {"max_abs_diff": float(np.abs(found - expected).max()), "inputs": len(samples),
            "limit": PARITY_LIMIT}

