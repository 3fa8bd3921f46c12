"""imagefit runs: the table of past runs and the comparison plot of their curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagefit import runs
from imagefit.errors import ImagefitError
from imagefit.report import history
from imagefit.report.history import (
    compare_curves,
    compare_runs,
    format_runs,
    format_seconds,
    list_runs,
)

CLASSIFICATION = ("accuracy", "error_rate")
REGRESSION = ("mae", "rmse")


def make_run(root: Path, folder: str, *, kind: str = "classification", epochs: int = 3,
             finished: bool = True, interrupted: bool = False, test: float | None = None,
             model: str = "small_cnn", data: str = "builtin:digits") -> Path:
    """A run directory written the way fit writes it: config.yaml, then per epoch a
    metrics.csv row and model.json, then metrics.json (unless the run was killed)."""
    run_dir = root / folder
    run_dir.mkdir(parents=True)
    runs.save_yaml(run_dir / "config.yaml", {"data": data, "data_description": data,
                                             "task": None, "epochs": epochs, "model": model,
                                             "name": None, "batch_size_used": 32})
    names = CLASSIFICATION if kind == "classification" else REGRESSION
    rows = []
    for epoch in range(1, epochs + 1):
        quality = epoch / 10
        row = {"epoch": epoch, "train_loss": 1.0 - quality, "valid_loss": 1.2 - quality,
               f"valid_{names[0]}": 0.5 + quality, f"valid_{names[1]}": 0.5 - quality,
               "time": 10.0}
        runs.append_metrics_row(run_dir, row)
        runs.save_json(run_dir / "model.json", {"architecture": model,
                                                "task": {"kind": kind, "names": ["y"]},
                                                "epochs_trained": epoch})
        rows.append(row)
    if finished:
        summary = {k: v for k, v in rows[-1].items() if k.startswith("valid_")}
        if test is not None:
            summary[f"test_{names[0]}"] = test
        runs.save_json(run_dir / "metrics.json", {
            **summary, "data": data, "task": kind, "epochs": epochs,
            "interrupted": interrupted, "seconds": 10.0 * epochs + 53, "train_seconds": 30.0})
    return run_dir


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "2026-01-03_10-00-00_pets", test=0.91234, model="resnet18", data="pets/")
    make_run(root, "2026-01-01_09-00-00_digits", epochs=2)
    make_run(root, "2026-01-02_09-00-00_ages", kind="regression")
    make_run(root, "2026-01-04_08-00-00_digits", interrupted=True)
    make_run(root, "2026-01-05_08-00-00_digits", finished=False)
    (root / "2026-01-06_08-00-00_empty").mkdir()
    (root / "2026-01-06_08-00-00_empty" / "config.yaml").write_text("")
    broken = make_run(root, "2026-01-07_08-00-00_broken")
    (broken / "metrics.json").write_text('{"valid_accuracy": 0.9')
    (root / "not-a-run").mkdir()
    (root / "notes.txt").write_text("hello")
    return root


def test_list_runs_one_row_per_run_oldest_first(runs_root):
    frame = list_runs(runs_root).set_index("run")
    assert list(frame.index) == [
        "2026-01-01_09-00-00_digits", "2026-01-02_09-00-00_ages", "2026-01-03_10-00-00_pets",
        "2026-01-04_08-00-00_digits", "2026-01-05_08-00-00_digits",
        "2026-01-06_08-00-00_empty", "2026-01-07_08-00-00_broken",
    ]
    assert list(frame["status"]) == ["done", "done", "done", "interrupted", "incomplete",
                                     "unreadable", "unreadable"]
    assert list(frame["name"][:3]) == ["digits", "ages", "pets"]
    pets = frame.loc["2026-01-03_10-00-00_pets"]
    assert (pets["data"], pets["model"], pets["epochs"]) == ("pets/", "resnet18", 3)
    assert (pets["metric"], pets["value"]) == ("test_accuracy", 0.91234)
    assert pets["seconds"] == 83.0
    assert str(pets["date"]) == "2026-01-03 10:00:00"
    digits = frame.loc["2026-01-01_09-00-00_digits"]
    assert (digits["metric"], digits["value"], digits["epochs"]) == ("valid_accuracy", 0.7, 2)
    ages = frame.loc["2026-01-02_09-00-00_ages"]
    assert (ages["metric"], ages["value"]) == ("valid_mae", pytest.approx(0.8))


def test_killed_run_shows_its_last_finished_epoch(runs_root):
    killed = list_runs(runs_root).set_index("run").loc["2026-01-05_08-00-00_digits"]
    assert killed["status"] == "incomplete"
    assert (killed["epochs"], killed["metric"]) == (3, "valid_accuracy")
    assert killed["value"] == pytest.approx(0.8)
    assert killed["seconds"] == pytest.approx(30.0)  # the epochs' own times


def test_a_metrics_row_cut_short_is_not_counted(tmp_path):
    run_dir = make_run(tmp_path, "2026-01-01_09-00-00_digits", finished=False)
    with open(run_dir / "metrics.csv", "a") as out:
        out.write("4,0.5,0.6")
    row = list_runs(tmp_path).iloc[0]
    assert (row["status"], row["epochs"]) == ("incomplete", 3)
    assert row["value"] == pytest.approx(0.8)


def test_run_with_only_its_config_is_incomplete_with_no_epochs(tmp_path):
    run_dir = tmp_path / "2026-01-01_09-00-00_digits"
    run_dir.mkdir()
    runs.save_yaml(run_dir / "config.yaml", {"data": "builtin:digits", "model": "small_cnn"})
    row = list_runs(tmp_path).iloc[0]
    assert (row["status"], row["epochs"], row["model"], row["metric"]) == (
        "incomplete", 0, "small_cnn", None)


def test_a_run_directory_given_as_the_folder_lists_itself(runs_root):
    frame = list_runs(runs_root / "2026-01-03_10-00-00_pets")
    assert list(frame["run"]) == ["2026-01-03_10-00-00_pets"]


def test_format_runs_aligns_a_readable_table(runs_root):
    lines = format_runs(list_runs(runs_root)).splitlines()
    assert lines[0].split() == ["date", "run", "data", "model", "epochs", "metric", "value",
                                "time", "status"]
    assert len(lines) == 8
    pets = next(line for line in lines if "pets" in line)
    assert pets.split() == ["2026-01-03", "10:00", "2026-01-03_10-00-00_pets", "pets/",
                            "resnet18", "3", "test_accuracy", "0.9123", "1m23s", "done"]
    unreadable = next(line for line in lines if "_empty" in line)
    assert unreadable.split()[-2:] == ["-", "unreadable"]
    status_column = lines[0].index("status")
    assert all(line[status_column - 2:status_column] == "  " and line[status_column] != " "
               for line in lines)


def test_format_seconds():
    assert [format_seconds(s) for s in (4.24, 83, 3599.6, 7500, None, float("nan"))] == [
        "4.2s", "1m23s", "1h00m", "2h05m", "-", "-"]


def test_an_empty_folder_gives_an_empty_table_with_a_note(tmp_path):
    frame = list_runs(tmp_path)
    assert frame.empty and list(frame.columns) == list(history.RUN_COLUMNS)
    note = format_runs(frame)
    assert str(tmp_path) in note and "imagefit fit" in note


def test_a_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(ImagefitError, match=r"runs folder .*nowhere not found: give the folder"):
        list_runs(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ImagefitError, match="file.txt is not a folder"):
        list_runs(tmp_path / "file.txt")


def test_compare_draws_one_line_per_run_in_each_shared_panel(runs_root, tmp_path, monkeypatch):
    names = ["2026-01-01_09-00-00_digits", "2026-01-03_10-00-00_pets",
             "2026-01-02_09-00-00_ages"]
    drawn = {}

    def record(figure, path):
        drawn.update({axis.get_title(): {line.get_label(): list(line.get_ydata())
                                         for line in axis.get_lines()}
                      for axis in figure.axes})
        drawn["legend"] = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        return save(figure, path)

    save = history.save_figure
    monkeypatch.setattr(history, "save_figure", record)
    out = compare_runs([runs_root / name for name in names], tmp_path / "out" / "compare.png")
    assert out == tmp_path / "out" / "compare.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["legend"] == names
    assert set(drawn) == {"train loss", "valid loss", "valid accuracy", "valid mae", "legend"}
    for panel in ("train loss", "valid loss"):
        assert list(drawn[panel]) == names
    assert list(drawn["valid accuracy"]) == names[:2]
    assert list(drawn["valid mae"]) == names[2:]
    assert drawn["valid accuracy"][names[0]] == pytest.approx([0.6, 0.7])


def test_compare_curves_are_per_epoch_series(runs_root):
    curves = compare_curves([runs_root / "2026-01-03_10-00-00_pets"])
    series = curves["valid_accuracy"]["2026-01-03_10-00-00_pets"]
    assert list(series.index) == [1, 2, 3]
    assert list(series) == pytest.approx([0.6, 0.7, 0.8])


def test_compare_errors_name_the_run_and_say_what_to_do(runs_root, tmp_path):
    no_epochs = runs_root / "2026-01-06_08-00-00_empty"
    with pytest.raises(ImagefitError, match=r"run .*_empty has no metrics.csv .*leave it out"):
        compare_runs([runs_root / "2026-01-01_09-00-00_digits", no_epochs], tmp_path / "c.png")
    with pytest.raises(ImagefitError, match=r"run .*notes.txt is not a directory: give run "
                                            "directories"):
        compare_runs([runs_root / "notes.txt"], tmp_path / "c.png")
    with pytest.raises(ImagefitError, match=r"run .*missing not found: give run directories"):
        compare_runs([runs_root / "missing"], tmp_path / "c.png")
    with pytest.raises(ImagefitError, match="at least one run"):
        compare_runs([], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_a_real_fit_is_listed_and_compared(tmp_path):
    from imagefit.api import fit

    result = fit("builtin:digits", epochs=1, progress=False, runs_dir=str(tmp_path))
    row = list_runs(tmp_path).iloc[0]
    assert (row["run"], row["status"], row["epochs"]) == (result.run_dir.name, "done", 1)
    assert (row["data"], row["model"], row["metric"]) == (
        "builtin:digits", "small_cnn_16", "valid_accuracy")
    assert row["value"] == pytest.approx(result.metrics["valid_accuracy"])
    out = compare_runs([result.run_dir], tmp_path / "compare.png")
    with Image.open(out) as picture:
        assert picture.width > 2 * picture.height  # one panel per curve, side by side
        assert np.asarray(picture.convert("L")).std() > 10
    curves = compare_curves([result.run_dir])
    assert set(curves) == {"train_loss", "valid_loss", "valid_accuracy"}
    assert curves["valid_accuracy"][result.run_dir.name].tolist() == pytest.approx(
        [row["valid_accuracy"] for row in result.history])
