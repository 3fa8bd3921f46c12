"""imagefit sweep: one fit per model, a table of their best epochs and generalization gaps
read from each run's metrics.csv, the loss figure, failures recorded, Ctrl-C keeping what
finished, a --budget shared between the models, and one-line errors before any training."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import isolated, shape_image
from imagefit import api, cli
from imagefit.config import FitConfig
from imagefit.data.table import from_arrays
from imagefit.errors import TrainingDiverged
from imagefit.models import create_model
from imagefit.train.callbacks import Callback
from imagefit.workflows import sweep as sweep_workflow
from imagefit.workflows.recipes import apply_small_image_recipe

SMALL = ["--image-size", "16", "--no-progress", "--no-report", "--no-tta"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def config_of(run_dir: str | Path) -> dict:
    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())


@pytest.fixture(scope="module")
def digits_sweep(tmp_path_factory):
    """small_cnn_16 and small_cnn_32 (--widths 16,32) on 16 px digits, 3 epochs each."""
    root = tmp_path_factory.mktemp("sweep")
    with isolated(root / "cache"):
        return api.sweep("builtin:digits", widths=[16, 32], epochs=3, image_size=16,
                         progress=False, report=False, tta=False, runs_dir=str(root / "runs"))


def test_table_holds_each_models_best_epoch_and_gap_from_its_metrics_csv(digits_sweep):
    for row in digits_sweep.rows:
        history = pd.read_csv(Path(row["run_dir"]) / "metrics.csv")
        best = history.loc[history["valid_accuracy"].idxmax()]  # the first of equals
        assert row["status"] == "done" and row["metric"] == "valid_accuracy"
        assert row["best"] == pytest.approx(best["valid_accuracy"])
        assert row["best_epoch"] == best["epoch"] == history.index[
            history["valid_accuracy"] == history["valid_accuracy"].max()][0] + 1
        assert row["gap_at_best"] == pytest.approx(best["valid_loss"] - best["train_loss"])
        assert row["epochs"] == len(history) == 3
        assert Path(row["run_dir"]) == digits_sweep.sweep_dir / row["model"]
    table = pd.read_csv(digits_sweep.sweep_dir / "sweep.csv")
    assert list(table["model"]) == [row["model"] for row in digits_sweep.rows]
    assert np.allclose(table["gap_at_best"], [row["gap_at_best"] for row in digits_sweep.rows])
    assert list(table["best_epoch"]) == [row["best_epoch"] for row in digits_sweep.rows]
    info = json.loads((digits_sweep.sweep_dir / "sweep.json").read_text())
    assert info["status"] == "done" and info["rows"] == digits_sweep.rows


def test_widths_train_the_small_nets_of_those_widths_with_early_stopping(digits_sweep):
    assert [row["model"] for row in digits_sweep.rows] == ["small_cnn_16", "small_cnn_32"]
    for row in digits_sweep.rows:
        config = config_of(row["run_dir"])
        assert config["model"] == row["model"]
        assert config["early_stop"] == 3  # the sweep's patience, on since it was not set
        # the same losses for every model: the small-image recipe would smooth the labels
        # of imagefit's own nets only (the control below), and augment longer fits
        assert config["label_smoothing"] == 0.0 and config["augment"] == "none"
        model = create_model(row["model"], 1, 10)
        assert row["params"] == sum(p.numel() for p in model.parameters())
    assert digits_sweep.rows[1]["params"] > digits_sweep.rows[0]["params"]
    control = FitConfig(model="small_cnn_16", epochs=20)
    apply_small_image_recipe(control, 16)
    assert control.label_smoothing == 0.1 and control.augment == "light"


def test_a_model_that_stops_improving_stops_three_epochs_after_its_best(tmp_path):
    """Validation accuracy on 30 images of squares and bars stops rising within a few epochs
    (its best at epoch 2-4 with seeds 0-2, at 1 in bf16), so the sweep's patience of 3 (not
    set here) ends the fit long before its 20 epochs."""
    rng = np.random.default_rng(0)
    kinds = np.arange(150) % 3
    images = np.stack([shape_image(int(kind), 16, rng, rgb=False) for kind in kinds])
    result = api.sweep(from_arrays(images, kinds), widths=[16], epochs=20, progress=False,
                       report=False, tta=False, runs_dir=str(tmp_path))
    row = result.rows[0]
    history = pd.read_csv(Path(row["run_dir"]) / "metrics.csv")
    best = history["valid_accuracy"].max()
    assert row["status"] == "done" and config_of(row["run_dir"])["early_stop"] == 3
    assert row["epochs"] == len(history) == row["best_epoch"] + 3 < 20
    assert (history["valid_accuracy"].iloc[row["best_epoch"]:] <= best).all()


def test_figure_is_a_png_with_a_colour_per_model(digits_sweep):
    path = digits_sweep.sweep_dir / "sweep.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert image.size == (1200, 420)
    for colour in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two: one per model
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) < 10).sum() > 200, colour


def test_command_prints_the_table_and_the_sweep_directory_last(tmp_path, capsys):
    code, out, err = run_cli(capsys, "sweep", "builtin:digits", "--models", "small_cnn_16",
                             "--epochs", "2", "--early-stop", "1", *SMALL,
                             "--runs-dir", tmp_path)
    assert code == 0, err
    lines = out.strip().splitlines()
    sweep_dir = Path(lines[-1])
    assert sweep_dir.parent == tmp_path and sweep_dir.name.endswith("_digits_sweep")
    assert lines[-2] == f"figure: {sweep_dir / 'sweep.png'}"
    row = pd.read_csv(sweep_dir / "sweep.csv").iloc[0]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "params"])
    assert lines[header].split() == ["model", "params", "best", "valid_accuracy", "best",
                                     "epoch", "gap", "at", "best", "epochs", "seconds",
                                     "status"]
    assert lines[header + 1].split()[:6] == ["small_cnn_16", f"{row['params']:,}",
                                             f"{row['best']:.4f}", str(row["best_epoch"]),
                                             f"{row['gap_at_best']:+.4f}", "2"]
    title, values = lines[header], lines[header + 1]
    assert title.index("status") == values.rindex("done")  # aligned columns
    assert title.index("valid_accuracy") + len("valid_accuracy") == \
        values.index(f"{row['best']:.4f}") + len(f"{row['best']:.4f}")
    assert config_of(sweep_dir / "small_cnn_16")["early_stop"] == 1  # the user's own kept


class Diverge(Callback):
    """A loss that stops being finite at the third step."""

    steps = 0

    def after_batch(self, learner) -> None:
        self.steps += 1
        if self.steps == 3:
            raise TrainingDiverged("loss is nan at step 3 of epoch 1: lower --lr")


class CtrlC(Callback):
    """Ctrl-C once the first epoch is finished."""

    def before_epoch(self, learner) -> None:
        if len(learner.history) == 1:
            raise KeyboardInterrupt


def with_callback(monkeypatch, model: str, callback: type[Callback]) -> None:
    """The sweep's fits, with ``callback`` in ``model``'s."""
    run_fit = sweep_workflow.run_fit

    def fit(data, cfg, callbacks=(), **options):
        return run_fit(data, cfg, [callback()] if cfg.model == model else callbacks, **options)

    monkeypatch.setattr(sweep_workflow, "run_fit", fit)


def test_a_failed_model_is_recorded_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    with_callback(monkeypatch, "small_cnn_32", Diverge)
    code, out, err = run_cli(capsys, "sweep", "builtin:digits", "--widths", "32,16",
                             "--epochs", "1", *SMALL, "--runs-dir", tmp_path)
    assert code == 1, err
    sweep_dir = Path(out.strip().splitlines()[-1])
    table = pd.read_csv(sweep_dir / "sweep.csv").set_index("model")
    reason = table.loc["small_cnn_32", "error"]
    assert reason.startswith("loss is nan at step 3 of epoch 1: lower --lr; ")
    assert reason.endswith("small_cnn_32 is marked failed (no epoch finished)")
    assert table.loc["small_cnn_32", "status"] == "failed"
    assert table.loc["small_cnn_32", "epochs"] == 0 and pd.isna(table.loc["small_cnn_32",
                                                                          "best"])
    assert table.loc["small_cnn_16", "status"] == "done"
    assert table.loc["small_cnn_16", "epochs"] == 1
    assert f"small_cnn_32 failed: {reason}" in out.splitlines()
    failed_run = json.loads((sweep_dir / "small_cnn_32" / "metrics.json").read_text())
    assert failed_run["status"] == "failed"


def test_ctrl_c_keeps_the_finished_models_table_and_figure(tmp_path, capsys, monkeypatch):
    with_callback(monkeypatch, "small_cnn_32", CtrlC)
    code, out, err = run_cli(capsys, "sweep", "builtin:digits", "--widths", "16,32",
                             "--epochs", "2", *SMALL, "--runs-dir", tmp_path)
    assert code == 130
    assert err.strip().splitlines()[-1] == (
        "imagefit: interrupted after 1 finished model(s); the sweep directory keeps their "
        "runs, table and figure")
    sweep_dir = Path(out.strip().splitlines()[-1])
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["status"] == "interrupted"
    assert [(r["model"], r["status"], r["epochs"]) for r in info["rows"]] == [
        ("small_cnn_16", "done", 2), ("small_cnn_32", "interrupted", 1)]
    assert (sweep_dir / "sweep.png").stat().st_size > 10_000
    assert any(line.startswith("small_cnn_32 ") and line.endswith("interrupted")
               for line in out.splitlines())


def test_budget_gives_each_model_a_share_of_the_time(tmp_path):
    total = 20.0
    started = time.monotonic()
    result = api.sweep("builtin:digits", widths=[16, 32], budget=f"{total:g}s", image_size=16,
                       progress=False, report=False, tta=False, runs_dir=str(tmp_path))
    elapsed = time.monotonic() - started
    assert elapsed <= total + 1.0  # the margin docs/DESIGN.md states for --budget tests
    assert [row["status"] for row in result.rows] == ["done", "done"]
    shares = [json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["budget"]
              ["budget_seconds"] for row in result.rows]
    # the first: half of what was left after reading the data, less the sweep's end
    assert 0.3 * total <= shares[0] <= (total - sweep_workflow.SWEEP_END_SECONDS) / 2
    # the second: what the first left
    first_seconds = result.rows[0]["seconds"]
    assert 0.3 * total <= shares[1] <= total - sweep_workflow.SWEEP_END_SECONDS - first_seconds
    info = json.loads((result.sweep_dir / "sweep.json").read_text())
    assert info["budget"]["budget"] == "20s" and info["budget"]["budget_seconds"] == total


@pytest.mark.parametrize("args, message", [
    (["--widths", "16,48"],
     "option --widths: imagefit has no small net of width 48; give widths among 16, 32, 64"),
    (["--widths", "16,x"], "option --widths: input should be a valid integer, unable to parse "
     "string as an integer (got 'x')"),
    ([], "give the models to compare: --models NAME,NAME,... (e.g. resnet10t,resnet18,"
     "resnet34) or --widths 16,32,64"),
    (["--models", "resnet18", "--widths", "16"],
     "--models and --widths both name the models to compare: give one of them"),
    (["--widths", "16", "--model", "resnet18"],
     "--model names one model: give the models to compare with --models"),
    (["--widths", "16", "--devices", "2"],
     "imagefit sweep trains in one process: leave out --devices"),
    (["--widths", "16,32,16"], "option --widths: 16 is given twice: give each model once"),
    (["--models", "small_cnn_16,small_cnn_16"],
     "option --models: small_cnn_16 is given twice: give each model once"),
    (["--widths", "16", "--valid-pct", "0"],
     "imagefit sweep compares the models' validation losses: give --valid-pct above 0 or "
     "data with a validation split"),
    (["--widths", "16", "--budget", "1m", "--epochs", "3"],
     "--epochs 3 and --budget 1m both set how long training lasts: give one of them"),
])
def test_bad_input_is_one_line_before_any_training(args, message, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    code, out, err = run_cli(capsys, "sweep", "builtin:digits", *args, "--runs-dir", runs_dir)
    assert code == 2
    assert err == f"imagefit: error: {message}\n"
    assert out == "" and not runs_dir.exists()


def test_an_unknown_model_is_named_with_the_close_ones_before_any_training(tmp_path,
                                                                          capsys):
    runs_dir = tmp_path / "runs"
    code, out, err = run_cli(capsys, "sweep", "builtin:digits", "--models",
                             "small_cnn_16,resnet81", "--runs-dir", runs_dir)
    assert code == 2 and out == "" and not runs_dir.exists()
    assert len(err.splitlines()) == 1
    assert err.startswith("imagefit: error: option --models: unknown model 'resnet81': did "
                          "you mean resnet18")
    assert err.endswith("? give small_cnn or a timm model name (`python -c 'import timm; "
                        "print(timm.list_models())'` lists them)\n")


NO_TORCH = """
import sys
from imagefit.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "timm", "pandas", "matplotlib") if m in sys.modules)
print("heavy:", ",".join(heavy) or "none", "code:", code)
"""


def test_help_and_option_errors_answer_without_loading_torch():
    done = subprocess.run([sys.executable, "-c", NO_TORCH, "sweep", "x"], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip().endswith("heavy: none code: 2"), done.stdout + done.stderr
    assert "give the models to compare" in done.stderr


def test_help_documents_the_sweep_options(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--models MODELS the models to compare, comma-separated" in text
    assert "--widths WIDTHS instead of --models, imagefit's small nets by width" in text
    assert "(patience; null: train every epoch) (default: 3)" in text
    assert "--epochs EPOCHS most epochs per model" in text


def test_imagefit_runs_lists_a_sweep_as_one_row_with_its_best_figure(digits_sweep):
    from imagefit.report.history import format_runs, list_runs

    frame = list_runs(digits_sweep.sweep_dir.parent)
    row = frame[frame["run"] == digits_sweep.sweep_dir.name].iloc[0]
    assert row["model"] == "sweep: small_cnn_16,small_cnn_32"
    assert row["status"] == "done" and row["metric"] == "valid_accuracy"
    assert row["value"] == max(r["best"] for r in digits_sweep.rows)
    assert row["epochs"] == sum(r["epochs"] for r in digits_sweep.rows)
    assert "incomplete" not in format_runs(frame)
