"""Experiment tracking (``--log tensorboard,mlflow``): a fit's options, its steps and epochs,
its final metrics and files, written to TensorBoard (through ``torch.utils.tensorboard``,
in RUN/tensorboard) and to MLflow (``MLFLOW_TRACKING_URI``, else a SQLite store in the runs
folder, since MLflow 3.13 refuses its old file store). Each tracker is a learner callback
for the steps and epochs, and is finished by the fit after its report is written."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ...errors import ImagefitError
from .base import Callback

TRACKERS = ("tensorboard", "mlflow")
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
MLFLOW_STORE, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"
ARTIFACTS = ("model.safetensors", "model.json", "config.yaml", "metrics.json", "metrics.csv",
             "report.html")
MAX_PARAM = 500  # MLflow keeps a parameter's value up to a length; ours are short anyway


def require_trackers(kinds: list[str] | None) -> None:
    """Each asked-for tracker's package is installed, or one line naming what to install."""
    for kind in kinds or ():
        module, package = PACKAGES[kind]
        try:
            __import__(module)
        except ImportError:
            raise ImagefitError(f"--log {kind} needs {package}: pip install 'imagefit[track]' "
                                f"(or pip install {package})") from None


def numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(float(v))}


def flat_options(options: dict, prefix: str = "") -> dict[str, str]:
    """Options as MLflow parameters and TensorBoard hparams: nested groups flattened,
    values as short text."""
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(flat_options(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[f"{prefix}{key}"] = text[:MAX_PARAM]
    return flat


class Tracker(Callback):
    """Steps (loss, learning rate) and epochs (every metric) as they finish; ``finish``
    with the final metrics and files; ``abort`` when the fit fails or is interrupted."""

    order = 95  # after the run writer: the epoch is on disk when it is logged

    def __init__(self, run_dir: Path, options: dict) -> None:
        self.run_dir, self.options = run_dir, options
        self.steps_logged = 0

    def after_epoch(self, learner) -> None:
        for row in learner.step_log[self.steps_logged:]:
            values = {"lr": row.get("lr"), "loss": row.get("loss")}
            self.log_step(row["step"], {k: float(v) for k, v in values.items()
                                        if v is not None})
        self.steps_logged = len(learner.step_log)
        self.log_epoch(len(learner.history), numbers(learner.history[-1]))

    def log_step(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, metrics: dict) -> None:
        raise NotImplementedError

    def abort(self, status: str) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, options: dict) -> None:
        super().__init__(run_dir, options)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_step(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(f"step/{name}", value, step)

    def log_epoch(self, epoch, values):
        for name, value in values.items():
            if name != "epoch":
                self.writer.add_scalar(f"epoch/{name}", value, epoch)

    def finish(self, metrics):
        import numpy as np
        from PIL import Image

        for path in sorted((self.run_dir / "plots").glob("*.png")):
            with Image.open(path) as image:
                self.writer.add_image(f"plots/{path.stem}", np.asarray(image.convert("RGB")),
                                      dataformats="HWC")
        final = {f"final/{k}": v for k, v in numbers(metrics).items()
                 if k.startswith(("valid_", "test_", "train_"))}
        self.writer.add_hparams(flat_options(self.options),
                                final or {"final/epochs": metrics.get("epochs", 0)},
                                run_name=".")
        self.writer.close()

    def abort(self, status):
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run per fit, through ``MlflowClient`` (no global active run, so cv folds and
    tune workers do not meet)."""

    def __init__(self, run_dir: Path, options: dict, runs_root: Path, experiment: str) -> None:
        super().__init__(run_dir, options)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(runs_root / MLFLOW_STORE).resolve()}"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=None if "MLFLOW_TRACKING_URI" in os.environ
                else (runs_root / MLFLOW_ARTIFACTS).resolve().as_uri())
            self.run_id = self.client.create_run(
                experiment_id, run_name=run_dir.name,
                tags={"imagefit.run_dir": str(run_dir.resolve())}).info.run_id
            params = [Param(k, v) for k, v in flat_options(options).items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        except Exception as error:  # a tracking server that cannot be reached, ...
            raise ImagefitError(f"--log mlflow: cannot log to {uri} ({type(error).__name__}: "
                                f"{str(error).strip().splitlines()[0][:200]})") from None
        self.uri = uri

    def _metrics(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}{k}", v, now, step) for k, v in values.items()]
        for start in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 500])

    def log_step(self, step, values):
        self._metrics(values, step, "step_")

    def log_epoch(self, epoch, values):
        self._metrics({k: v for k, v in values.items() if k != "epoch"}, epoch)

    def finish(self, metrics):
        final = {f"final_{k}": v for k, v in numbers(metrics).items()}
        self._metrics(final, int(metrics.get("epochs") or 0))
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir / "plots"), "plots")
        self.client.set_terminated(self.run_id, "FINISHED")

    def abort(self, status):
        self.client.set_terminated(self.run_id, status)


def make_trackers(kinds: list[str] | None, run_dir: Path, options: dict,
                  runs_root: Path) -> list[Tracker]:
    """The trackers ``--log`` names; MLflow's experiment is $MLFLOW_EXPERIMENT_NAME, else
    imagefit."""
    require_trackers(kinds)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "imagefit"
    made: list[Tracker] = []
    for kind in dict.fromkeys(kinds or ()):
        if kind == "tensorboard":
            made.append(TensorBoardTracker(run_dir, options))
        else:
            made.append(MlflowTracker(run_dir, options, runs_root, experiment))
    return made


def end_trackers(callbacks, metrics: dict | None = None, status: str = "FINISHED") -> None:
    """Finish (``metrics`` given) or abort every tracker among ``callbacks``; a tracker that
    fails to finish is a warning, not a lost fit."""
    import warnings

    from ...errors import ImagefitWarning

    for tracker in [c for c in callbacks if isinstance(c, Tracker)]:
        try:
            tracker.finish(metrics) if metrics is not None else tracker.abort(status)
        except Exception as error:
            warnings.warn(f"--log: {type(tracker).__name__} could not finish "
                          f"({type(error).__name__}: {str(error)[:160]})", ImagefitWarning,
                          stacklevel=2)
