"""--log (the experiment trackers) on imagefit cv, read back by the trackers' own readers:
each fold is a run of its own in TensorBoard and in MLflow, with the figures cv printed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from imagefit.cli import main
from imagefit.workflows.cv import FOLD_METRICS


def test_cv_logs_each_fold_to_tensorboard_and_mlflow(tmp_path, capsys, monkeypatch, one_thread):
    """`imagefit cv builtin:digits --folds 2 --log tensorboard,mlflow`: each fold's run
    directory holds its TensorBoard events (a value per epoch, the last the fold's figure),
    and the MLflow store in the CV directory holds one finished run per fold and no other,
    named after the fold, with its epochs and the figure cv printed and wrote for it."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["cv", "builtin:digits", "--folds", "2", "--epochs", "2", "--log",
                 "tensorboard,mlflow", "--no-tta", "--no-report", "--no-progress",
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    printed = capsys.readouterr().out.splitlines()
    cv_dir = Path(printed[-1])
    table = pd.read_csv(cv_dir / FOLD_METRICS)
    assert list(table["run"]) == ["fold_0", "fold_1"]
    figures = dict(zip(table["run"], table["valid_accuracy"]))
    for fold, (name, figure) in enumerate(figures.items()):
        assert f"fold {fold}: valid_accuracy {figure:.4f}" in printed
        assert json.loads((cv_dir / name / "metrics.json").read_text())[
            "valid_accuracy"] == pytest.approx(figure, abs=1e-9)
        events = EventAccumulator(str(cv_dir / name / "tensorboard"))
        events.Reload()
        logged = events.Scalars("epoch/valid_accuracy")
        assert [e.step for e in logged] == [1, 2]
        assert logged[-1].value == pytest.approx(figure, abs=1e-6)

    client = MlflowClient(tracking_uri=f"sqlite:///{cv_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("imagefit")
    found = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in found) == ["fold_0", "fold_1"]
    for run in found:
        name = run.info.run_name
        assert run.info.status == "FINISHED"
        assert run.data.tags["imagefit.run_dir"] == str((cv_dir / name).resolve())
        assert run.data.metrics["final_valid_accuracy"] == pytest.approx(figures[name],
                                                                         abs=1e-6)
        history = client.get_metric_history(run.info.run_id, "valid_accuracy")
        assert [m.step for m in history] == [1, 2]
        assert history[-1].value == pytest.approx(figures[name], abs=1e-6)
