"""The command line: options from flags and YAML, the three commands, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import as_from_a_terminal
from imagefit.cli import build_parser, main
from imagefit.config import EvaluateOptions, FitConfig, PredictOptions
from imagefit.data.sources import read_source


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize("command, model", [("fit", FitConfig), ("predict", PredictOptions),
                                            ("evaluate", EvaluateOptions)])
def test_help_documents_every_option(command, model, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # wrapped lines
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        shown = f"{flag}, --no-{flag[2:]} " if field.annotation is bool else \
            f"{flag} {name.upper()} "
        assert shown in text, name
        description = " ".join(field.description.split()).replace("- ", "-")
        start = text.index(shown) + len(shown)
        assert text[start:].startswith(description), name


def test_fit_prints_the_run_directory_last(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "fit", "builtin:digits", "--epochs", "1", "--runs-dir",
                           tmp_path, "--no-progress")
    assert code == 0
    run_dir = Path(last_line(out))
    assert run_dir.parent == tmp_path and (run_dir / "model.safetensors").is_file()
    assert "valid_accuracy" in out


def test_flags_override_the_config_file(tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text("epochs: 3\nvalid-pct: 0.1\nseed: 7\nprogress: false\n")
    code, out, _ = run_cli(capsys, "fit", "builtin:digits", "--config", config, "--epochs", "1",
                           "--runs-dir", tmp_path)
    assert code == 0
    resolved = yaml.safe_load((Path(last_line(out)) / "config.yaml").read_text())
    assert resolved["epochs"] == 1 and resolved["valid_pct"] == 0.1 and resolved["seed"] == 7


def test_unknown_config_key_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text("epochz: 3\n")
    code, _, err = run_cli(capsys, "fit", "builtin:digits", "--config", config)
    assert code == 2
    assert err.strip() == "imagefit: error: option --epochz: extra inputs are not permitted " \
                          "(got 3)"


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "fit", "builtin:digits", "--config", tmp_path / "no.yaml")
    assert code == 2 and "config file" in err and "not found" in err


def test_bad_flag_value_names_the_option(capsys):
    code, _, err = run_cli(capsys, "fit", "builtin:digits", "--resize", "stretch")
    assert code == 2
    assert err.startswith("imagefit: error: option --resize:") and "'crop'" in err


def test_errors_are_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    done = subprocess.run([sys.executable, "-m", "imagefit", "fit", str(missing)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"imagefit: error: data {missing} not found: give a folder of class folders, a CSV "
        "file, or builtin:digits / builtin:fashion-mnist"
    )
    assert "Traceback" not in done.stderr


def test_multilabel_and_regression_csv_from_the_command_line(labelled_images, tmp_path,
                                                             capsys):
    folder, names, kinds = labelled_images
    tags = {0: "square|bright", 1: "bar", 2: "bar|vertical"}
    multilabel = folder / "tags.csv"
    pd.DataFrame({"file": names, "tags": [tags[int(k)] for k in kinds]}).to_csv(
        multilabel, index=False)
    regression = folder / "ages.csv"
    pd.DataFrame({"file": names, "age": 20.5 + 30 * kinds}).to_csv(regression, index=False)

    for csv, metric in ((multilabel, "f1"), (regression, "mae")):
        code, out, _ = run_cli(capsys, "fit", csv, "--epochs", "3", "--runs-dir", tmp_path,
                               "--no-progress")
        assert code == 0
        run_dir = last_line(out)
        metrics_out = tmp_path / f"{csv.stem}-metrics.json"
        code, out, _ = run_cli(capsys, "evaluate", run_dir, csv, "--out", metrics_out,
                               "--no-progress")
        assert code == 0 and f"{metric}:" in out
        assert metric in json.loads(metrics_out.read_text())
        preds = tmp_path / f"{csv.stem}-preds.csv"
        code, out, _ = run_cli(capsys, "predict", run_dir, folder, "--out", preds,
                               "--no-progress")
        assert code == 0 and f"wrote {len(names)} predictions" in out
        assert len(pd.read_csv(preds)) == len(names)


def test_predict_prints_csv_without_out(tmp_path, capsys, labelled_images):
    folder, names, _ = labelled_images
    code, out, _ = run_cli(capsys, "fit", "builtin:digits", "--epochs", "1", "--runs-dir",
                           tmp_path, "--no-progress")
    code, out, _ = run_cli(capsys, "predict", last_line(out), folder / names[0],
                           folder / names[1], "--no-progress")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("path,label,prob_0") and len(lines) == 3


def test_predict_on_folder_without_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, "predict", tmp_path, tmp_path)
    assert code == 2
    assert f"{tmp_path} holds no model" in err and "imagefit fit" in err


def test_sigint_keeps_the_last_finished_epoch(tmp_path):
    """A real Ctrl-C: the run directory keeps the finished epochs' model and metrics."""
    import os
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "imagefit", "fit", "builtin:digits", "--epochs", "200",
         "--runs-dir", str(tmp_path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=as_from_a_terminal,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        csvs = list(tmp_path.glob("*/metrics.csv"))
        if csvs and len(csvs[0].read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "keeps its model and metrics" in err
    run_dir = Path(last_line(out))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    epochs_in_csv = len(pd.read_csv(run_dir / "metrics.csv"))
    assert metrics["interrupted"] is True and metrics["epochs"] == epochs_in_csv >= 2
    info = json.loads((run_dir / "model.json").read_text())
    assert info["epochs_trained"] == epochs_in_csv
    assert (run_dir / "model.safetensors").is_file()


def test_show_batch_writes_a_grid_with_labels(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    code, printed, _ = run_cli(capsys, "show-batch", "builtin:digits", "--augment", "side_on",
                               "--out", out, "--n-images", "9", "--no-progress")
    assert code == 0 and last_line(printed) == str(out)
    with Image.open(out) as grid:
        assert grid.size[0] >= 400 and grid.size[1] >= 400
        assert np.asarray(grid.convert("L")).std() > 20  # not blank


def test_show_batch_same_image_with_mixing_labels(tmp_path, capsys):
    from imagefit.api import show_batch

    out = show_batch("builtin:digits", tmp_path / "same.png", same_image=True, n_images=4,
                     augment="top_down", progress=False)
    assert out.is_file()


def test_resume_and_data_together_or_neither_are_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "fit", "builtin:digits", "--resume", tmp_path)
    assert code == 2 and "--resume RUN takes its data and options from the run" in err
    code, _, err = run_cli(capsys, "fit")
    assert code == 2 and "give DATA to fit, or --resume RUN" in err


def test_unavailable_device_is_a_clear_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    code, _, err = run_cli(capsys, "fit", "builtin:digits", "--device", "cuda")
    assert code == 2 and "option --device: CUDA is not available here; use --device cpu" in err
    code, _, err = run_cli(capsys, "fit", "builtin:digits", "--device", "tpu9")
    assert code == 2 and "option --device: unknown device 'tpu9'" in err


# -- hardening: fast answers, one-line errors for plain mistakes ---------------------------

NO_TORCH = """
import sys
from imagefit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "timm", "pandas", "matplotlib") if m in sys.modules)
print("heavy:", ",".join(heavy) or "none", "code:", code)
"""


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0), (["fit", "--help"], 0), (["fti"], 2),
    (["fit", "x", "--lr", "abc"], 2), (["fit", "x", "--epochs", "0"], 2),
    (["fit", "x", "--augment", "rotate"], 2), (["cv", "x", "--folds", "1"], 2),
])
def test_help_and_option_errors_answer_without_loading_torch(argv, code):
    """`imagefit --help` took 5.4 s and 1 GB when every command paid for torch."""
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip().endswith(f"heavy: none code: {code}"), done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_a_number_option_given_text_names_the_flag_not_its_types(capsys):
    assert main(["fit", "builtin:digits", "--lr", "abc"]) == 2
    assert capsys.readouterr().err.strip() == (
        "imagefit: error: option --lr: give a positive number such as 3e-3, or auto (got 'abc')")
    assert main(["fit", "builtin:digits", "--tta-augment", "mirror"]) == 2
    err = capsys.readouterr().err
    assert err.count("option --tta-augment") == 1 and "input should be 'auto', 'flip'" in err


def test_yaml_errors_name_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text("epochs: 3\naugment_options: {rotate: [\n")
    assert main(["fit", "builtin:digits", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"config file {config} line" in err and "is not valid YAML: fix it" in err
    config.write_text("- epochs\n")
    assert main(["fit", "builtin:digits", "--config", str(config)]) == 2
    assert "must hold a mapping of option: value" in capsys.readouterr().err


def test_help_states_when_tta_is_on(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # wrapped hyphens
    start = text.index("--tta, --no-tta")
    tta = text[start:text.index("--tta-n TTA_N", start)]
    assert "(default: on; off for the small-image recipe's fits of under 10 epochs" in tta
    assert "True" not in tta


def colour_count(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(pixels.astype(int) - colour).sum(axis=-1) < 10).sum())


def test_lr_find_explain_and_compare_through_the_command_line(tmp_path, capsys):
    from imagefit import api

    plot = tmp_path / "sweep.png"
    assert main(["lr-find", "builtin:digits", "--out", str(plot), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(plot)
    printed = dict(line.split(": ") for line in lines[:3])
    # the sweep the API gives for the same data and seed, its suggestions printed to 3 digits
    sweep = api.lr_find("builtin:digits", None, progress=False)
    assert printed == {name: f"{lr:.2e}" for name, lr in sweep.suggestions.items()}
    assert list(printed) == ["steepest", "valley", "minimum/10"]
    # as documented: a tenth of the rate at the lowest smoothed loss (the first 5% of the
    # points left out), and the steepest fall and the valley before that lowest loss
    skip = len(sweep.losses) // 20
    lowest = sweep.lrs[skip + int(np.argmin(sweep.losses[skip:]))]
    assert sweep.suggestions["minimum/10"] == pytest.approx(lowest / 10, rel=1e-12)
    assert 1e-7 <= sweep.suggestions["steepest"] <= lowest
    assert 1e-7 <= sweep.suggestions["valley"] <= lowest
    with Image.open(plot) as picture:
        assert picture.size == (600, 400)  # 6 x 4 inches at 100 dpi
        pixels = np.asarray(picture.convert("RGB"))
    assert colour_count(pixels, (31, 119, 180)) > 300  # the loss curve, tab:blue (807 here)
    for marker in ((214, 39, 40), (44, 160, 44), (255, 127, 14)):  # the three suggestions
        assert colour_count(pixels, marker) > 50, marker  # each dot and its legend: 122

    runs_dir = tmp_path / "runs"
    for seed in (0, 1):
        assert main(["fit", "builtin:digits", "--epochs", "2", "--seed", str(seed),
                     "--runs-dir", str(runs_dir), "--no-progress", "--no-report"]) == 0
    first, second = sorted(runs_dir.iterdir())
    capsys.readouterr()

    images = tmp_path / "images"
    images.mkdir()
    digits = read_source("builtin:digits")
    for i in range(3):
        Image.fromarray(digits.arrays[i, ..., 0]).save(images / f"digit_{i}.png")
    overlays = tmp_path / "overlays"
    assert main(["explain", str(first), str(images), "--out", str(overlays),
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 3 overlays to {overlays}"
    assert sorted(p.name for p in overlays.iterdir()) == [
        f"digit_{i}_gradcam.png" for i in range(3)]
    drawn = []
    for i in range(3):
        with Image.open(overlays / f"digit_{i}_gradcam.png") as picture:
            pixels = np.asarray(picture.convert("RGB")).astype(int)
        drawn.append(pixels)
        half = pixels.shape[1] // 2
        image, overlay = pixels[:, :half], pixels[:, half:]
        # the digit in grey, beside it under a jet heat map spanning the scale (Grad-CAM
        # scales each map to 0..1): red where it looked, blue where not (1,500-21,000
        # pixels of each over fp32 and bf16 fits, seeds 0-1; a blank map gives one hue)
        assert ((image.max(axis=-1) - image.min(axis=-1)) <= 3).all()
        assert ((overlay[..., 0] - overlay[..., 2]) > 60).sum() > 1000
        assert ((overlay[..., 2] - overlay[..., 0]) > 60).sum() > 1000
    assert not np.array_equal(drawn[0], drawn[1])

    compare = tmp_path / "compare.png"
    assert main(["runs", "--compare", str(first), str(second), "--out", str(compare)]) == 0
    assert capsys.readouterr().out.strip() == str(compare)
    with Image.open(compare) as picture:
        assert picture.width > 2 * picture.height
