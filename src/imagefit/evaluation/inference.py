"""Using a trained model: loading it from its run directory, predicting files, folders
and CSVs, and evaluating it on a dataset split."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import run_records, runs
from ..augment.pipeline import BatchPipeline
from ..augment.text import TextPipeline
from ..config import (
    EvaluateOptions,
    InputOptions,
    PredictOptions,
    SourceOptions,
    merge_options,
    refuse_unused,
)
from ..data.cache import NO_ROW_REMEDY, CacheSettings, build_cache, warn_unreadable
from ..data.inputs import ImageInput, Input, TextInput, input_class, input_of, table_input
from ..data.prepare import prepare_images
from ..data.sources import (
    IMAGE_EXTENSIONS,
    read_csv_paths,
    read_frame,
    read_source,
    require_column,
)
from ..data.splits import assign_validation
from ..data.table import Table
from ..data.text import check_texts, prepare_texts
from ..devices import inference_precision, resolve_device
from ..errors import ImagefitError, ImagefitWarning
from ..forward import TTA, Average, model_outputs
from ..metrics import all_metrics
from ..models import (
    create_model,
)
from ..models.text import create_text_model
from ..tasks import Task


@dataclass
class LoadedModel:
    """A trained model with what it needs to see images as it saw them in training."""

    model: nn.Module
    task: Task
    settings: CacheSettings | None  # None for a text model
    pipeline: BatchPipeline
    info: dict
    precision: str = "fp32"  # the autocast its forward passes run in

    @cached_property
    def input(self) -> Input:
        """What it reads: its images' settings, or its characters and text length."""
        return ImageInput(self.settings) if self.settings is not None else \
            TextInput.from_info(self.info)


def load_model(run: str | Path, device: str = "auto", precision: str = "auto") -> LoadedModel:
    """The model of a run directory, from safetensors + JSON (no code is unpickled), to run
    in ``precision`` (auto: as it was trained, so its figures are the fit's)."""
    info = run_records.read_model_info(run)
    task = Task.from_dict(info["task"])
    if not input_class(info).reads_images:
        return _load_text_model(run, info, task, device, precision)
    try:
        model = create_model(info["architecture"], info["channels"], task.n_out,
                             head=info.get("head", "timm"), head_hidden=info.get("head_hidden"),
                             dropout=info.get("dropout", 0.0), act=info.get("act"))
    except ImagefitError as error:
        raise ImagefitError(f"{Path(run) / runs.MODEL_INFO} names a model that cannot be "
                            f"made ({error})") from None
    run_records.load_weights(model, run)
    _warn_if_failed(Path(run))
    target = resolve_device(device)
    model = model.to(target, memory_format=torch.channels_last).eval()
    settings = ImageInput.from_info(info).settings
    norm = info["normalization"]
    return LoadedModel(model, task, settings, BatchPipeline(norm["mean"], norm["std"]), info,
                       inference_precision(precision, info.get("precision"), target))


def _load_text_model(run: str | Path, info: dict, task: Task, device: str,
                     precision: str) -> LoadedModel:
    """A text model: its characters and length from model.json, no image settings."""
    vocabulary = TextInput.from_info(info).vocabulary
    model = create_text_model(info["architecture"], len(vocabulary), task.n_out,
                              dropout=info.get("dropout") or 0.0)
    run_records.load_weights(model, run)
    _warn_if_failed(Path(run))
    target = resolve_device(device)
    return LoadedModel(model.to(target).eval(), task, None, TextPipeline(), info,
                       inference_precision(precision, info.get("precision"), target))


def _warn_if_failed(run: Path) -> None:
    """A model kept from a run that ended in failure is its last finished epoch: say so."""
    try:
        metrics = run_records.read_metrics(run) or {}
    except ImagefitError:
        return  # only a warning hangs on it: a damaged metrics.json does not stop the model
    if metrics.get("status") == "failed":
        warnings.warn(f"{run} failed ({str(metrics.get('error', ''))[:160]}); its model is "
                      f"from epoch {metrics.get('epochs', '?')}, the last that finished",
                      ImagefitWarning, stacklevel=3)


def _outputs(loaded: LoadedModel, images: torch.Tensor, rows: np.ndarray, batch_size: int,
             tta: TTA | None = None) -> torch.Tensor:
    return model_outputs(loaded.model, loaded.pipeline, loaded.task, images, rows,
                         batch_size, tta, precision=loaded.precision)


# What only a CSV file of image paths uses.
CSV_INPUT_OPTIONS = ("path_col", "folder", "suffix")


def expand_inputs(inputs: list[str | Path], options: InputOptions) -> list[str]:
    """Image files from files, folders (searched recursively) and CSV files of paths."""
    refuse_unused(options, ("text_col",), "the model reads images, not texts")
    if not any(Path(item).suffix.lower() == ".csv" for item in inputs):
        refuse_unused(options, CSV_INPUT_OPTIONS, "no INPUT is a CSV file")
    paths: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(str(p) for p in item.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImagefitError(f"folder {item} holds no image files")
            paths += found
        elif item.suffix.lower() == ".csv" and item.is_file():
            options_for_csv = SourceOptions(path_col=options.path_col, folder=options.folder,
                                            suffix=options.suffix)
            paths += read_csv_paths(item, options_for_csv)
        elif item.is_file():
            paths.append(str(item))
        else:
            raise ImagefitError(f"input {item} not found: give image files, folders or a CSV")
    return paths


def predict(run: str | Path, inputs: list[str | Path], out: str | Path | None = None,
            options: PredictOptions | None = None, texts: list[str] | None = None,
            **overrides: Any) -> pd.DataFrame:
    """Predictions for image files, folders or CSVs of paths: a row per readable image with
    the path, the predicted label(s) or value(s) and the class probabilities. A text
    model predicts ``texts`` and the texts of CSV files (``text_col``, else the first
    column), a row per text. ``run`` may also be an ONNX file written by ``export``, run by
    onnxruntime."""
    options = merge_options(PredictOptions, options, overrides)
    if out is not None:
        out = runs.output_file(out, "--out")
    if Path(run).suffix.lower() == ".onnx":
        frame = _predict_onnx(Path(run), list(inputs), texts, options)
        if out is not None:
            runs.write_atomic(out, frame.to_csv(index=False))
        return frame
    members = load_models(run, options.device, options.snapshots, options.precision)
    loaded = members[0][1]
    if not loaded.input.reads_images or texts:
        frame = _predict_texts(members, list(inputs), texts or [], options)
        if out is not None:
            runs.write_atomic(out, frame.to_csv(index=False))
        return frame
    paths = expand_inputs(list(inputs), options)
    cache = build_cache(paths, loaded.settings, options.cache_dir, progress=options.progress)
    warn_unreadable(cache, paths, NO_ROW_REMEDY)
    rows = np.setdiff1d(np.arange(len(paths)), cache.failed)
    outputs = ensemble_outputs(members, cache.tensor(), rows, options.bs, options)
    task = loaded.task
    activated = task.activate(outputs)
    frame = _prediction_frame(task, [paths[r] for r in rows], activated, options)
    if out is not None:
        runs.write_atomic(out, frame.to_csv(index=False))
    return frame


def _predict_texts(members: list[tuple[Path, LoadedModel]], inputs: list[str | Path],
                   texts: list[str], options: PredictOptions) -> pd.DataFrame:
    loaded = members[0][1]
    if loaded.input.reads_images:
        raise ImagefitError(f"{members[0][0]} holds an image model: give it images, not "
                            "--text")
    texts = _texts_of(inputs, texts, options)
    average = Average(loaded.task)
    for _, member in members:  # each fold model reads with its own characters
        average.add(_outputs(member, member.input.encode(texts), np.arange(len(texts)),
                             options.bs))
    return _text_frame(loaded.task, texts, loaded.task.activate(average.outputs()))


def _text_frame(task: Task, texts: list[str], activated: torch.Tensor) -> pd.DataFrame:
    frame = pd.DataFrame({"text": texts})
    for name, column in task.prediction_columns(activated, "table").items():
        frame[name] = column
    return frame


def _texts_of(inputs: list[str | Path], texts: list[str] | None,
              options: PredictOptions) -> list[str]:
    """The texts of --text and of CSV files (``text_col``, else the first column)."""
    refuse_unused(options, CSV_INPUT_OPTIONS, "a text model reads texts, not image paths")
    if not inputs:
        refuse_unused(options, ("text_col",), "no INPUT is a CSV file")
    texts = list(texts or [])
    for item in map(Path, inputs):
        if item.suffix.lower() not in (".csv", ".tsv") or not item.is_file():
            raise ImagefitError(f"input {item}: a text model reads texts given with --text, or "
                                "a CSV file with a column of texts")
        frame = read_frame(item)
        column = require_column(frame, options.text_col or frame.columns[0], "--text-col",
                                item.name)
        texts += check_texts(frame[column], item.name, column)
    if not texts:
        raise ImagefitError("nothing to predict: give texts with --text, or a CSV file")
    empty = [t for t in texts if not t.strip()]
    if empty:
        raise ImagefitError("--text: an empty text cannot be predicted; give each text at "
                            "least one character")
    return texts


def _predict_onnx(path: Path, inputs: list[str | Path], texts: list[str] | None,
                  options: PredictOptions) -> pd.DataFrame:
    """Predictions of an exported model through onnxruntime, as a run's would be: the same
    columns, test-time augmentation included."""
    from .onnx_model import OnnxModel  # onnxruntime only when asked for

    if options.snapshots:
        raise ImagefitError("--snapshots averages a run's snapshot models: give the run "
                            "directory, not an exported file")
    model = OnnxModel(path)
    info = model.description["model"]
    task = Task.from_dict(info["task"])
    model_input = input_of(info)
    if not model_input.reads_images:
        texts = _texts_of(inputs, texts, options)
        return _text_frame(task, texts, _batched(model, model_input.encode(texts), options.bs))
    if texts:
        raise ImagefitError(f"{path} holds an image model: give it images, not --text")
    settings = model_input.settings
    paths = expand_inputs(list(inputs), options)
    cache = build_cache(paths, settings, options.cache_dir, progress=options.progress)
    warn_unreadable(cache, paths, NO_ROW_REMEDY)
    rows = np.setdiff1d(np.arange(len(paths)), cache.failed)
    images = cache.tensor().index_select(0, torch.as_tensor(rows)).permute(0, 3, 1, 2)
    activated = _batched(model, images, options.bs)
    tta = TTA.from_options(options, None)
    if tta is not None and tta.n and len(rows):
        augmenter = BatchPipeline([0.0] * settings.channels, [1.0] * settings.channels,
                                  tta.augment)
        generator = torch.Generator().manual_seed(tta.seed)
        total = activated.clone()
        for _ in range(tta.n):  # averaged as probabilities (values), as a run's TTA is
            version = augmenter.augment_batch(images.float() / 255.0, generator)
            total += _batched(model, version.mul(255.0).round_().clamp_(0, 255).to(torch.uint8),
                              options.bs)
        activated = total / (tta.n + 1)
    return _prediction_frame(task, [paths[r] for r in rows], activated, options)


def _batched(model, items: torch.Tensor, batch_size: int) -> torch.Tensor:
    if not len(items):
        return torch.zeros(0)
    return torch.cat([model(items[i:i + batch_size]) for i in range(0, len(items),
                                                                     batch_size)])


def _prediction_frame(task: Task, paths: list[str], activated: torch.Tensor,
                      options: PredictOptions) -> pd.DataFrame:
    if options.format == "table":
        frame = pd.DataFrame({"path": paths})
    else:
        frame = pd.DataFrame({options.id_col: [Path(p).stem for p in paths]})
    for name, column in task.prediction_columns(activated, options.format).items():
        frame[name] = column
    return frame


def load_models(run: str | Path, device: str = "auto", snapshots: bool = False,
                precision: str = "auto") -> list[tuple[Path, LoadedModel]]:
    """The model(s) behind ``run``: a run's own model, a CV directory's fold models, or (with
    ``snapshots``) a run's SGDR snapshot models; each with its run directory."""
    run = Path(run)
    if snapshots:
        folders = sorted((run / "checkpoints").glob("snapshot_*"),
                         key=lambda p: int(p.name.rsplit("_", 1)[-1]))
        if not folders:
            raise ImagefitError(f"{run} has no snapshot models (checkpoints/snapshot_K): fit "
                                "with --schedule sgdr --snapshots")
    elif (run / "cv.json").is_file():
        folders = [run / name for name in _cv_runs(run / "cv.json")]
    else:
        return [(run, load_model(run, device, precision))]
    members = [(folder, load_model(folder, device, precision)) for folder in folders]
    first = members[0][1]
    for folder, member in members[1:]:
        if (member.settings, member.task.names) != (first.settings, first.task.names):
            raise ImagefitError(f"{folder} sees images or classes differently from "
                                f"{folders[0]}: an ensemble needs models of one fit setup")
    return members


def _cv_runs(path: Path) -> list[str]:
    """The fold runs a CV directory's cv.json lists, or one clear error when it is damaged."""
    advice = "restore it from a copy, or predict with one fold's run directory"
    names = run_records.read_record(path, advice=advice).get("runs")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ImagefitError(f"{path} is damaged (no list of fold runs): {advice}")
    return names


def ensemble_outputs(members: list[tuple[Path, LoadedModel]], images: torch.Tensor,
                     rows: np.ndarray, batch_size: int, options: Any) -> torch.Tensor:
    """Raw-like outputs of the average of the members' probabilities (values for
    regression), each with its own TTA when ``options.tta``."""
    average = Average(members[0][1].task)
    for folder, loaded in members:
        tta = TTA.from_options(options, _trained_augment(folder))
        average.add(_outputs(loaded, images, rows, batch_size, tta))
    return average.outputs()


def _align_targets(table: Table, task: Task) -> np.ndarray:
    """The table's targets in the order of the model's classes or targets."""
    names = table.task.names
    if table.task.kind != task.kind:
        raise ImagefitError(
            f"the data's targets are {table.task.kind} but the model was trained for "
            f"{task.kind}: pass --task {task.kind} or give matching data"
        )
    unknown = [n for n in names if n not in task.names]
    if not task.has_classes:
        if len(names) != len(task.names):
            raise ImagefitError(
                f"the data has {len(names)} target(s), the model {len(task.names)} "
                f"({', '.join(task.names)}): choose them with --label-col"
            )
        return table.targets
    if unknown:
        raise ImagefitError(
            f"the data has classes the model was not trained on: {', '.join(unknown[:5])}"
        )
    position = np.array([task.names.index(n) for n in names])
    if task.single_label:
        return position[table.targets]
    aligned = np.zeros((len(table), task.n_out), dtype=np.float32)
    aligned[:, position] = table.targets
    return aligned


def evaluate(run: str | Path, data: str | Path | Table, out: str | Path | None = None,
             options: EvaluateOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Loss and metrics of a run's model on a split of ``data``: the test split when there is
    one, else the validation split carved as the run carved it."""
    options = merge_options(EvaluateOptions, options, overrides)
    if out is not None:
        out = runs.output_file(out, "--out", "metrics.json")
    loaded = load_model(run, options.device, options.precision)
    run_config = _read_run_config(Path(run))
    if not loaded.input.reads_images and options.task is None:
        options = options.model_copy(update={"task": TextInput.name})
    table = data if isinstance(data, Table) else read_source(data, options)
    split = options.split or ("test" if table.has_split("test") else "valid")
    if split == "valid":
        table = assign_validation(table, run_config.get("valid_pct", 0.2),
                                  run_config.get("seed", 0), run_config.get("stratify", True))
    model_input, data_input = loaded.input, table_input(table)
    if type(model_input) is not data_input:
        raise ImagefitError(f"{run} holds {model_input.a_model} and {table.description} "
                            f"holds {data_input.noun}: give data of the kind it was trained "
                            "on")
    if not model_input.reads_images:
        prepared = prepare_texts(table, length=model_input.length,
                                 vocabulary=model_input.vocabulary)
    else:
        prepared = prepare_images(table, loaded.settings, cache_dir=options.cache_dir,
                                  strict=options.strict, progress=options.progress)
    rows = prepared.rows(table, split)
    if len(rows) == 0:
        raise ImagefitError(f"{table.description} has no {split} images: choose --split")
    targets = loaded.task.encode_targets(_align_targets(table, loaded.task))
    images = prepared.cache.tensor()
    outputs = _outputs(loaded, images, rows, options.bs)
    results: dict[str, Any] = {"split": split, "n_images": len(rows),
                               **score(loaded.task, outputs, targets[rows])}
    tta = TTA.from_options(options, run_config.get("augment_options"))
    if tta is not None:
        tta_outputs = _outputs(loaded, images, rows, options.bs, tta)
        results.update({f"tta_{name}": value
                        for name, value in score(loaded.task, tta_outputs,
                                                 targets[rows]).items()})
    if out is not None:
        runs.save_json(out, results)
    return results


def score(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The loss and every metric of the task's kind."""
    return {"loss": task.loss(outputs, targets).item(), **all_metrics(task, outputs, targets)}


def _trained_augment(folder: Path) -> dict | None:
    """The training augmentation recorded in a run's (or a snapshot's run's) config.yaml."""
    for candidate in (folder, folder.parent.parent):
        config = run_records.read_config(candidate)
        if config is not None:
            return config.get("augment_options")
    return None


def _read_run_config(run: Path) -> dict:
    config = run_records.read_config(run)
    if config is None:
        warnings.warn(f"{run / 'config.yaml'} is missing: the validation split uses the "
                      "default fraction and seed", ImagefitWarning, stacklevel=3)
    return config or {}
