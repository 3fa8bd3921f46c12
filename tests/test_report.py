"""The run report: rendered by headless Chromium, escaped, regenerated; `imagefit runs`."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    log_loss,
    r2_score,
    roc_auc_score,
)

from conftest import isolated, shape_image, write_image
from imagefit import api, cli
from imagefit.data.table import from_arrays
from imagefit.metrics import best_threshold
from imagefit.tasks import Task

HOSTILE = "<script>alert(1)</script>"
HOSTILE_IMG = "<img src=x onerror=\"document.title='pwned'\">"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed: `make test` installs it (Debian's "
    "chromium) when run as root; install it to run the browser tests")


def chromium(url: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
         *flags, url],
        capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """A finished fit on a CSV whose class names and file names hold HTML."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    names = ["square", HOSTILE, HOSTILE_IMG]
    rows = []
    for i in range(90):
        kind = i % 3
        file = f"a&b<i>{i}.png"
        write_image(root / "images" / file, shape_image(kind, 16, rng, rgb=False))
        rows.append({"file": file, "label": names[kind]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    with isolated(root / "cache"):
        result = api.fit(str(root / "labels.csv"), folder=str(root / "images"), epochs=2,
                         progress=False, runs_dir=str(root / "runs"), tta=True, tta_n=2)
    return result.run_dir


def test_every_run_writes_the_report_and_its_parts(hostile_run):
    run = hostile_run
    for name in ("report.html", "data_summary.json", "interpretation.json",
                 "interpretation.safetensors", "plots/confusion.png", "plots/curves.png",
                 "plots/reliability.png", "plots/top_losses.png", "plots/training.png",
                 "plots/epochs.png", "plots/data_classes.png", "plots/data_samples.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    saved = load_file(run / "interpretation.safetensors")  # the validation outputs it used
    probabilities = saved["outputs"].softmax(1).numpy()
    targets = saved["targets"].long().numpy()
    predicted = probabilities.argmax(1)
    assert metrics["valid_accuracy"] == pytest.approx((predicted == targets).mean())
    assert metrics["valid_balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(targets, predicted))
    assert metrics["valid_roc_auc"] == pytest.approx(
        roc_auc_score(targets, probabilities, multi_class="ovr"), abs=1e-4)
    assert metrics["valid_log_loss"] == pytest.approx(
        log_loss(targets, probabilities, labels=[0, 1, 2]), rel=1e-4)
    assert metrics["valid_quadratic_kappa"] == pytest.approx(
        cohen_kappa_score(targets, predicted, weights="quadratic"), abs=1e-6)
    assert metrics["valid_tta_accuracy"] != metrics["valid_accuracy"] or \
        metrics["valid_tta_loss"] != metrics["valid_loss"]  # TTA's own figures
    page = (run / "report.html").read_text()
    for name, value in (("valid_accuracy", metrics["valid_accuracy"]),
                        ("valid_tta_accuracy", metrics["valid_tta_accuracy"])):
        assert f"{value:.4f}" in page, name  # the figures reach the page
    for section in ("config", "dataset", "training", "metrics", "interpretation"):
        assert f'<section id="{section}">' in page


def test_user_strings_reach_the_page_escaped(hostile_run):
    page = (hostile_run / "report.html").read_text()
    assert HOSTILE not in page and HOSTILE_IMG not in page
    assert html.escape(HOSTILE) in page  # the class name is shown, as text
    assert "&lt;i&gt;" in page  # and the file names of the top losses
    assert "<script" not in page.lower()  # the page itself needs no script


@needs_chromium
def test_report_renders_in_chromium_with_its_sections(hostile_run, tmp_path):
    url = (hostile_run / "report.html").as_uri()
    shot = tmp_path / "report.png"
    chromium(url, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 20, "the screenshot is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "the screenshot is flat"
    dom = chromium(url, tmp_path, "--dump-dom").stdout
    for section, title in (("config", "Config"), ("dataset", "Dataset"),
                           ("training", "Training"), ("metrics", "Metrics"),
                           ("interpretation", "Interpretation")):
        assert f'<section id="{section}">' in dom and f"<h2>{title}</h2>" in dom
    assert dom.count('src="data:image/png;base64,') >= 8  # every plot is embedded


@needs_chromium
def test_a_hostile_class_name_is_shown_as_text_and_runs_nothing(hostile_run, tmp_path):
    dom = chromium((hostile_run / "report.html").as_uri(), tmp_path, "--dump-dom").stdout
    # the DOM after the page ran: the names are text nodes, serialized escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script" not in dom.lower()
    assert "<title>imagefit report:" in dom and "pwned" not in dom.split("</title>")[0]
    assert '<img src="x"' not in dom  # the img name stayed text: no element, no handler


def test_report_command_regenerates_from_the_run_files(hostile_run, tmp_path, capsys):
    run = tmp_path / hostile_run.name  # a copy: the other tests read the fixture's files
    shutil.copytree(hostile_run, run)
    before = (run / "interpretation.json").read_text()
    confusion = np.asarray(Image.open(run / "plots" / "confusion.png").convert("RGB"))
    for name in ("report.html", "plots/confusion.png", "plots/top_losses.png",
                 "plots/training.png", "plots/epochs.png"):
        (run / name).unlink()
    assert cli.main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    for name in ("report.html", "plots/confusion.png", "plots/top_losses.png",
                 "plots/training.png", "plots/epochs.png"):
        assert (run / name).is_file(), name
    again = json.loads((run / "interpretation.json").read_text())
    assert again["top_losses"] == json.loads(before)["top_losses"]
    assert again["per_class"] == json.loads(before)["per_class"]
    redrawn = np.asarray(Image.open(run / "plots" / "confusion.png").convert("RGB"))
    assert redrawn.shape == confusion.shape and np.abs(
        redrawn.astype(int) - confusion).mean() < 1.0  # the same counts, drawn again
    page = (run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 8


def test_report_command_errors_name_the_folder(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert f"run {tmp_path / 'nowhere'} not found: give a run directory" in \
        capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "is not a run directory (no config.yaml or metrics.json)" in capsys.readouterr().err


def test_runs_command_lists_the_run(hostile_run, capsys):
    assert cli.main(["runs", str(hostile_run.parent)]) == 0
    out = capsys.readouterr().out
    assert hostile_run.name in out and "valid_accuracy" in out and "done" in out


def test_multilabel_fit_stores_the_best_threshold(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, (96, 12, 12), dtype=np.uint8)
    targets = np.zeros((96, 2), dtype=np.float32)
    targets[::2, 0] = 1
    targets[::3, 1] = 1
    images[targets[:, 0] == 1, :6] += 180
    images[targets[:, 1] == 1, :, :6] += 60
    table = from_arrays(images, targets, task="multilabel", names=["top", "left"])
    run = api.fit(table, epochs=2, progress=False, runs_dir=str(tmp_path), tta=False).run_dir
    info = json.loads((run / "model.json").read_text())
    interpretation = json.loads((run / "interpretation.json").read_text())
    best = interpretation["best_threshold"]
    assert info["task"]["threshold"] == best["threshold"] == best["threshold_used"]
    saved = load_file(run / "interpretation.safetensors")  # the validation outputs
    chosen, f1 = best_threshold(Task.from_dict(info["task"]), saved["outputs"],
                                saved["targets"])
    assert best["threshold"] == pytest.approx(chosen)  # chosen on validation, as it says
    assert (run / "plots" / "threshold.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"valid_subset_accuracy", "valid_hamming_loss", "valid_f1"} <= set(metrics)


def test_regression_fit_draws_predictions_and_worst_images(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.uniform(20, 80, 80).astype(np.float32)
    images = np.clip(values[:, None, None] * 3 + rng.normal(0, 5, (80, 10, 10)), 0, 255)
    table = from_arrays(images.astype(np.uint8), values, names=["age"])
    run = api.fit(table, epochs=2, progress=False, runs_dir=str(tmp_path), tta=False).run_dir
    for name in ("regression.png", "top_losses.png", "data_targets.png"):
        picture = np.asarray(Image.open(run / "plots" / name).convert("L"))
        assert picture.std() > 10, name  # drawn, not blank
    interpretation = json.loads((run / "interpretation.json").read_text())
    losses = [row["loss"] for row in interpretation["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    metrics = json.loads((run / "metrics.json").read_text())
    task = Task.from_dict(json.loads((run / "model.json").read_text())["task"])
    saved = load_file(run / "interpretation.safetensors")
    predicted = task.activate(saved["outputs"]).numpy().ravel()
    truth = task.activate(saved["targets"]).numpy().ravel()  # stored standardized too
    assert metrics["valid_mae"] == pytest.approx(np.abs(predicted - truth).mean(), rel=1e-4)
    assert metrics["valid_rmse"] == pytest.approx(
        np.sqrt(((predicted - truth) ** 2).mean()), rel=1e-4)
    assert metrics["valid_r2"] == pytest.approx(r2_score(truth, predicted), abs=1e-4)
    worst = np.sort(np.abs(predicted - truth))[::-1][:len(losses)]  # in the targets' units
    assert losses == pytest.approx(worst.tolist(), rel=1e-4)
