"""What ``imagefit serve`` runs: a served model (a run's, a CV directory's folds, or an
exported ONNX file through onnxruntime), uploads decoded as the cache decodes files, answers
per image, and the batcher that runs the images of concurrent requests in one forward pass."""

from __future__ import annotations

import io
import queue
import re
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import runs
from ..data.cache import CacheSettings, decode_image
from ..data.inputs import input_class
from ..errors import ImagefitError
from ..forward import Average
from ..tasks import Task
from .inference import LoadedModel, load_model, load_models
from .saliency import loaded_outputs, saliency_maps


class UploadError(Exception):
    """An upload the server refuses: the HTTP status and the message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServedModel:
    """The model behind the server. ``members``: a run's model or a CV directory's folds
    (averaged); ``onnx``: an exported file run by onnxruntime instead; ``explainer``: the
    PyTorch model Grad-CAM runs on (a run's, the first fold's, or the run an ONNX file was
    exported from when it is still there), or None."""

    source: Path
    task: Task
    settings: CacheSettings
    info: dict
    engine: str  # "torch" or "onnxruntime"
    members: list[LoadedModel] = field(default_factory=list)
    onnx: Any = None
    explainer: LoadedModel | None = None
    metrics: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, source: str | Path, device: str = "auto", precision: str = "auto",
             saliency: bool = True) -> ServedModel:
        source = Path(source)
        if source.is_file():
            return cls._load_onnx(source, saliency)
        if not source.is_dir():
            raise ImagefitError(f"{source} not found: give a run directory, a CV directory or "
                                "an ONNX file written by imagefit export")
        members = [loaded for _, loaded in load_models(source, device, precision=precision)]
        first = members[0]
        _refuse_text(first.info, source)
        return cls(source, first.task, first.settings, first.info, "torch", members,
                   explainer=first if saliency else None, metrics=_run_metrics(source))

    @classmethod
    def _load_onnx(cls, path: Path, saliency: bool) -> ServedModel:
        from .onnx_model import OnnxModel  # onnxruntime only when serving an exported file

        onnx = OnnxModel(path)
        description = onnx.description
        info = description["model"]
        _refuse_text(info, path)
        origin = Path(description.get("source") or "")
        explainer = None
        if saliency and description.get("members", 1) == 1 and (origin / runs.MODEL_INFO).is_file():
            try:
                explainer = load_model(origin, "cpu", "fp32")
            except (ImagefitError, OSError, ValueError, KeyError):
                explainer = None  # the run changed since: predictions still come from the file
        settings = CacheSettings(info["image_size"], info["channels"], info["resize"])
        return cls(path, Task.from_dict(info["task"]), settings, info, "onnxruntime",
                   onnx=onnx, explainer=explainer,
                   metrics=_run_metrics(origin) if origin.name else {})

    @property
    def name(self) -> str:
        """The run's (or CV directory's, or ONNX file's) name: what the page, /model and
        /docs show, never the path on the server."""
        return self.source.resolve().name

    # -- inputs and outputs ---------------------------------------------------------------

    def decode(self, data: bytes, name: str, max_pixels: int) -> torch.Tensor:
        """One uploaded file as the model's uint8 image (C, S, S), decoded and resized as the
        cache decodes files; anything that is not a readable image is an ``UploadError``.
        ``max_pixels`` is at most PIL's ``Image.MAX_IMAGE_PIXELS`` (serve checks), so an
        image PIL refuses as a decompression bomb is over it too: 413, as the README says."""
        if not data:
            raise UploadError(400, f"{name} is empty: choose an image file")
        try:
            with warnings.catch_warnings():  # the size is checked below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
        except Image.DecompressionBombError as error:  # over twice PIL's limit: not opened
            found = re.search(r"\((\d+) pixels\)", str(error))
            pixels = f"{int(found[1]):,}" if found else f"over {2 * Image.MAX_IMAGE_PIXELS:,}"
            raise UploadError(413, f"{name} has {pixels} pixels, more than the limit of "
                                   f"{max_pixels:,}: send a smaller image") from None
        except Exception:  # PIL's many kinds of "this is no image"
            raise UploadError(415, f"{name} is not an image PIL can read (PNG, JPEG, BMP, "
                                   "TIFF, WebP, ...): choose an image file") from None
        if width * height > max_pixels:
            raise UploadError(413, f"{name} has {width} x {height} pixels, more than the "
                                   f"limit of {max_pixels:,}: send a smaller image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                array, _ = decode_image(io.BytesIO(data), self.settings)
        except Exception as error:  # truncated or damaged past its header
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise UploadError(422, f"{name} could not be decoded ({reason}): is the file "
                                   "truncated or damaged?") from None
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Activated outputs (probabilities or values) of uint8 images (N, C, S, S): a CV
        directory's folds averaged, as ``predict`` averages them."""
        if self.onnx is not None:
            return self.onnx(images)
        average = Average(self.task)
        with self.lock:
            for member in self.members:
                average.add(loaded_outputs(member, images))
        return self.task.activate(average.outputs())

    def explain(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Grad-CAM maps (N, S, S) in [0, 1] of the ``targets`` (class indices)."""
        if self.explainer is None:
            raise UploadError(409, "this server has no PyTorch model to draw saliency with")
        with self.lock:  # hooks go on the model for the call: no forward pass meanwhile
            return saliency_maps(self.explainer, images, "gradcam", targets)

    def answer(self, activated: torch.Tensor, top_k: int) -> dict:
        """One image's answer: its top classes with probabilities, the labels over the
        threshold too (multi-label), or its values (regression); ``target`` is the index a
        saliency map explains."""
        names = self.task.names
        if not self.task.has_classes:
            return {"values": {n: float(v) for n, v in zip(names, activated.tolist())},
                    "target": 0}
        order = activated.argsort(descending=True)[:top_k].tolist()
        answer: dict[str, Any] = {"top": [{"label": names[i],
                                           "probability": float(activated[i])} for i in order]}
        if self.task.single_label:
            answer["label"] = names[order[0]]
        else:
            answer["labels"] = [n for n, p in zip(names, activated.tolist())
                                if p >= self.task.threshold]
        answer["target"] = order[0]
        return answer

    def describe(self) -> dict:
        """What ``GET /model`` says: the task, its classes, how images are seen, metrics."""
        return {
            "source": self.name, "engine": self.engine,
            "architecture": self.info.get("architecture"), "task": self.task.kind,
            ("classes" if self.task.has_classes else "targets"): list(self.task.names),
            "threshold": self.task.threshold if self.task.chooses_threshold else None,
            "image_size": self.settings.size, "channels": self.settings.channels,
            "resize": self.settings.resize, "members": max(1, len(self.members)),
            "saliency": self.explainer is not None, "metrics": self.metrics,
        }


def _refuse_text(info: dict, source: Path) -> None:
    if not input_class(info).reads_images:
        raise ImagefitError(f"{source} holds a text model; serve shows images: predict texts "
                            "with imagefit predict RUN --text ...")


def _run_metrics(run: Path) -> dict:
    """The final metrics of a run (or a CV directory's mean), numbers only."""
    for name, key in (("metrics.json", None), ("cv.json", "mean")):
        try:
            found = runs.load_json(run / name)
        except (OSError, ValueError):
            continue
        found = found.get(key, {}) if key and isinstance(found, dict) else found
        if isinstance(found, dict):
            return {k: v for k, v in found.items() if isinstance(v, (int, float))
                    and not isinstance(v, bool) and k.split("_", 1)[0] in ("valid", "test")}
    return {}


class Batcher:
    """Runs the images of concurrent requests in one forward pass: a worker thread takes the
    first waiting request, lets others join for ``wait_s`` (or until ``max_batch`` images),
    runs them together and hands each request its rows. ``submit`` returns a Future."""

    def __init__(self, run_batch, max_batch: int, wait_s: float) -> None:
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_s
        self.queue: queue.Queue = queue.Queue()
        self.batches = self.images = 0  # forward passes run and images they held
        self.thread = threading.Thread(target=self._work, name="imagefit-batcher", daemon=True)
        self.thread.start()

    def submit(self, images: torch.Tensor) -> Future:
        future: Future = Future()
        self.queue.put((images, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, count, stop = [first], len(first[0]), False
            deadline = time.monotonic() + self.wait_s
            while count < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic())) \
                        if self.wait_s > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if count + len(job[0]) > self.max_batch:
                    self._run(jobs)
                    jobs, count = [], 0
                jobs.append(job)
                count += len(job[0])
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list) -> None:
        if not jobs:
            return
        try:
            outputs = self.run_batch(torch.cat([images for images, _ in jobs]))
        except Exception as error:  # the requests fail, the worker goes on
            for _, future in jobs:
                future.set_exception(error)
            return
        self.batches += 1
        self.images += len(outputs)
        start = 0
        for images, future in jobs:
            future.set_result(outputs[start:start + len(images)])
            start += len(images)
