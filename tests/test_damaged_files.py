"""Every run file and export file is read through one checked path: a damaged or edited
config.yaml, metrics.json, model.safetensors, model.onnx or model.onnx.json gives one line
that names the file and says what to do, on every command that reads it, never a traceback;
edited weights are named as edited (by their checksum), never as a diverged fit. Also the
messages of issue 32 made true: the file kind an --out folder should hold, a check of blank
images, and no folder left by a failed explain."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import isolated
from imagefit.api import check, explain, export, fit, from_arrays, predict
from imagefit.cli import main
from imagefit.data.audit_images import image_statistics
from imagefit.data.cache import CacheSettings, cache_arrays
from imagefit.data.prepare import channel_stats, measure_channels, prepare_images
from imagefit.data.sources import read_source
from imagefit.errors import ImagefitError, ImagefitWarning

RESTORE = "restore it from a copy of the run, or train the model again"
CHECKSUM = ("does not match the checksum in model.json: the file was changed or damaged; "
            "train again or restore it")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 1-epoch digits run, copied afresh by ``run_copy`` for each test."""
    root = tmp_path_factory.mktemp("damaged")
    with isolated(root / "cache"):
        result = fit("builtin:digits", epochs=1, runs_dir=str(root / "runs"),
                              progress=False, report=False)
    return result.run_dir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """The run exported to ONNX once; copied afresh by ``onnx_copy``."""
    root = tmp_path_factory.mktemp("exported")
    with isolated(root / "cache"):
        export(trained, root / "model.onnx", progress=False, parity_images=8)
    return root / "model.onnx"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    target = tmp_path / "runs" / trained.name
    shutil.copytree(trained, target)
    return target


@pytest.fixture
def onnx_copy(exported, tmp_path) -> Path:
    target = tmp_path / "export" / "model.onnx"
    target.parent.mkdir()
    shutil.copy(exported, target)
    shutil.copy(f"{exported}.json", f"{target}.json")
    return target


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "one.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(path)
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    """The exit status of ``imagefit ARGV`` and what it printed to stderr."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str) -> str:
    """The single error line of a failed command (exit 2, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("imagefit: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- config.yaml ------------------------------------------------------------------------

DAMAGED_CONFIGS = {
    "not YAML": ("data: [unclosed\n", "config.yaml is damaged (not readable YAML) at line 2 "
                                      "(expected ',' or ']', but got '<stream end>')"),
    "a string": ("just a string\n", "config.yaml is damaged (it holds a string, not a mapping "
                                    "of keys to values)"),
    "a list": ("- a\n- b\n", "config.yaml is damaged (it holds a list, not a mapping of keys "
                             "to values)"),
    "a wrong type": ("data: builtin:digits\nvalid_pct: most\n",
                     "config.yaml is damaged (valid_pct: input should be a valid number"),
}


def command(name: str, run: Path, image: Path) -> list:
    return {"predict": ["predict", run, image], "evaluate": ["evaluate", run, "builtin:digits"],
            "export": ["export", run]}[name]


@pytest.mark.parametrize("damage", DAMAGED_CONFIGS)
@pytest.mark.parametrize("name", ["predict", "evaluate", "export"])
def test_damaged_config_is_one_line_naming_it(run_copy, image, capsys, name, damage):
    text, expected = DAMAGED_CONFIGS[damage]
    (run_copy / "config.yaml").write_text(text)
    line = one_error_line(*cli(capsys, *command(name, run_copy, image), "--no-progress"))
    assert f"{run_copy / 'config.yaml'} is damaged" in line and expected in line
    advice = "restore it from a copy of the run, or export another run" if name == "export" \
        else RESTORE
    assert line.endswith(advice)
    assert not (run_copy / "model.onnx").exists()


def test_report_of_a_damaged_config_warns_and_still_writes_the_page(run_copy, capsys):
    (run_copy / "config.yaml").write_text("- a\n- b\n")
    code, err = cli(capsys, "report", run_copy)
    assert code == 0 and "Traceback" not in err
    assert (f"imagefit: warning: {run_copy / 'config.yaml'} is damaged (it holds a list, not a "
            "mapping of keys to values): the report leaves out what it held") in err
    assert (run_copy / "report.html").is_file()


# -- metrics.json and imagefit runs -----------------------------------------------------

def test_runs_table_marks_a_run_with_damaged_metrics_and_lists_the_others(run_copy, capsys):
    other = run_copy.parent / "2030-01-01_00-00-00_other"
    shutil.copytree(run_copy, other)
    metrics = json.loads((run_copy / "metrics.json").read_text())
    (run_copy / "metrics.json").write_text(json.dumps({**metrics, "epochs": "many"}))
    assert main(["runs", str(run_copy.parent)]) == 0
    captured = capsys.readouterr()
    rows = {line.split()[2]: line for line in captured.out.splitlines()[1:]}
    assert rows[run_copy.name].endswith("unreadable")
    assert rows[other.name].endswith("done") and " 1  " in rows[other.name]
    assert "Traceback" not in captured.err


# -- model.safetensors: the checksum ----------------------------------------------------

def test_model_json_records_the_weights_checksum(trained):
    info = json.loads((trained / "model.json").read_text())
    assert info["weights_sha256"] == sha256(trained / "model.safetensors")


def overwrite_tensors(run: Path, value: float) -> None:
    """Every floating tensor of the weights file set to ``value``: a file safetensors still
    reads, with other bytes."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "model.safetensors")
    save_file({name: torch.full_like(t, value) if t.is_floating_point() else t
               for name, t in tensors.items()}, run / "model.safetensors")


def overwrite_data_with_ff(run: Path) -> None:
    """The tensor bytes after the header overwritten with 0xFF (NaN as float32)."""
    path = run / "model.safetensors"
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("edit", [overwrite_data_with_ff, lambda run: overwrite_tensors(run, 0.5)],
                         ids=["0xFF bytes", "ordinary values"])
def test_edited_weights_are_named_by_their_checksum_not_as_a_divergence(run_copy, image,
                                                                        capsys, edit):
    edit(run_copy)
    line = one_error_line(*cli(capsys, "predict", run_copy, image, "--no-progress"))
    assert line == f"imagefit: error: {run_copy / 'model.safetensors'} {CHECKSUM}"
    assert "diverged" not in line


@pytest.mark.parametrize("argv", [["evaluate", "RUN", "builtin:digits"], ["export", "RUN"],
                                  ["explain", "RUN", "IMAGE", "--out", "OUT"],
                                  ["serve", "RUN"], ["summary", "RUN"]],
                         ids=lambda argv: argv[0])
def test_edited_weights_are_named_by_every_command_that_loads_them(run_copy, image, tmp_path,
                                                                   capsys, argv):
    overwrite_tensors(run_copy, 0.5)
    filled = [{"RUN": run_copy, "IMAGE": image, "OUT": tmp_path / "maps"}.get(a, a)
              for a in argv]
    line = one_error_line(*cli(capsys, *filled))
    assert line == f"imagefit: error: {run_copy / 'model.safetensors'} {CHECKSUM}"
    assert not (tmp_path / "maps").exists()


def test_report_of_edited_weights_warns_and_still_writes_the_page(run_copy, capsys):
    overwrite_tensors(run_copy, 0.5)
    code, err = cli(capsys, "report", run_copy)
    assert code == 0 and "Traceback" not in err
    assert (f"imagefit: warning: {run_copy / 'model.safetensors'} {CHECKSUM}; the report leaves "
            "the model summary out") in err
    assert (run_copy / "report.html").is_file()


def test_weights_of_a_diverged_fit_are_still_named_as_such(run_copy, image):
    overwrite_tensors(run_copy, float("nan"))  # as a diverged fit saves them: checksum and all
    info = json.loads((run_copy / "model.json").read_text())
    info["weights_sha256"] = sha256(run_copy / "model.safetensors")
    (run_copy / "model.json").write_text(json.dumps(info))
    with pytest.raises(ImagefitError, match="holds NaN or infinite weights: its fit diverged"):
        predict(run_copy, [image], progress=False)


def test_a_model_saved_before_the_checksum_loads_without_the_check(run_copy, image, recwarn):
    info = json.loads((run_copy / "model.json").read_text())
    del info["weights_sha256"]
    (run_copy / "model.json").write_text(json.dumps(info))
    overwrite_tensors(run_copy, 0.5)
    assert len(predict(run_copy, [image], progress=False)) == 1
    assert not [w for w in recwarn if "checksum" in str(w.message)]


def test_truncated_weights_are_damaged(run_copy, image):
    weights = run_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ImagefitError, match=f"{weights} is damaged .*: {RESTORE}"):
        predict(run_copy, [image], progress=False)


# -- model.onnx and model.onnx.json -----------------------------------------------------

def test_export_json_records_the_onnx_checksum(exported):
    description = json.loads(Path(f"{exported}.json").read_text())
    assert description["onnx_sha256"] == sha256(exported)
    assert description["model"]["weights_sha256"]


@pytest.mark.parametrize("name", ["predict", "serve"])
def test_truncated_onnx_is_named_by_its_checksum(onnx_copy, image, capsys, name):
    onnx_copy.write_bytes(onnx_copy.read_bytes()[:200])
    argv = ["predict", onnx_copy, image] if name == "predict" else ["serve", onnx_copy]
    line = one_error_line(*cli(capsys, *argv))
    assert line == (f"imagefit: error: {onnx_copy} does not match the checksum in "
                    "model.onnx.json: the file was changed or damaged; export the run again")


@pytest.mark.parametrize("name", ["predict", "serve"])
def test_truncated_onnx_of_an_older_export_is_not_readable(onnx_copy, image, capsys, name):
    description = json.loads(Path(f"{onnx_copy}.json").read_text())
    del description["onnx_sha256"]
    Path(f"{onnx_copy}.json").write_text(json.dumps(description))
    onnx_copy.write_bytes(onnx_copy.read_bytes()[:200])
    argv = ["predict", onnx_copy, image] if name == "predict" else ["serve", onnx_copy]
    line = one_error_line(*cli(capsys, *argv))
    assert line.startswith(f"imagefit: error: {onnx_copy} is not a readable ONNX file (")
    assert line.endswith("): export the run again")


@pytest.mark.parametrize("text, expected", [
    ('{"input": {"name": "images"', "is damaged (not readable JSON) at line 1 (Expecting ',' "
                                    "delimiter)"),
    ("[1, 2]", "is damaged (it holds a list, not a mapping of keys to values)"),
    ('{"input": {"name": "images", "dtype": "uint8", "shape": ["batch", 1, 8, 8]}, '
     '"model": {"architecture": "small_cnn_16"}}', "does not describe a model (task: field "
                                                    "required)"),
])
def test_damaged_onnx_json_is_one_line_naming_it(onnx_copy, image, capsys, text, expected):
    Path(f"{onnx_copy}.json").write_text(text)
    line = one_error_line(*cli(capsys, "predict", onnx_copy, image))
    assert f"{onnx_copy}.json {expected}" in line
    assert line.endswith(": export the run again")


# -- cv.json ----------------------------------------------------------------------------

def test_label_issues_of_a_cv_with_a_damaged_cv_json_is_one_line(run_copy, tmp_path, capsys):
    pytest.importorskip("cleanlab")
    cv_dir = tmp_path / "cv"
    shutil.copytree(run_copy, cv_dir / "fold_0")
    (cv_dir / "oof.csv").write_text("row,fold,label\n0,0,1\n")
    (cv_dir / "cv.json").write_text(json.dumps({"task": "classification", "folds": "five"}))
    line = one_error_line(*cli(capsys, "label-issues", cv_dir))
    assert line == (f"imagefit: error: {cv_dir / 'cv.json'} is damaged (folds: input should be "
                    "a valid integer, unable to parse string as an integer): restore it from a "
                    "copy, or run imagefit cv again")


# -- the issues CSV of --drop-rows ------------------------------------------------------

@pytest.mark.parametrize("row, score, expected", [
    ("3", "high", "line 2: score 'high' is not a number"),
    ("abc", "0.9", "line 2: row 'abc' is not a whole number"),
])
def test_drop_rows_with_cells_that_are_not_numbers(tmp_path, capsys, row, score, expected):
    issues = tmp_path / "label_issues.csv"
    issues.write_text(f"rank,row,path,given,suggested,score\n1,{row},,1,7,{score}\n")
    line = one_error_line(*cli(capsys, "fit", "builtin:digits", "--drop-rows", issues,
                               "--min-score", "0.5", "--epochs", "1", "--runs-dir",
                               tmp_path / "runs", "--no-progress"))
    assert line == (f"imagefit: error: option --drop-rows: {issues} {expected}: give the CSV "
                    "written by imagefit label-issues")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- messages made true -----------------------------------------------------------------

def test_evaluate_out_a_folder_suggests_a_json_file(run_copy, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    line = one_error_line(*cli(capsys, "evaluate", run_copy, "builtin:digits", "--out", folder))
    assert line == (f"imagefit: error: --out {folder} is a folder: give a file name, e.g. "
                    f"{folder / 'metrics.json'}")


def test_export_out_a_folder_suggests_an_onnx_file(run_copy, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    line = one_error_line(*cli(capsys, "export", run_copy, "--out", folder))
    assert line == (f"imagefit: error: --out {folder} is a folder: give a file name, e.g. "
                    f"{folder / 'model.onnx'}")


def test_a_failed_explain_leaves_no_folder_it_made(run_copy, tmp_path, capsys):
    out = tmp_path / "maps" / "gradcam"
    line = one_error_line(*cli(capsys, "explain", run_copy, tmp_path / "nowhere.png",
                               "--out", out))
    assert "nowhere.png not found" in line
    assert not (tmp_path / "maps").exists()


def test_a_failed_explain_keeps_a_folder_that_was_there(run_copy, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    one_error_line(*cli(capsys, "explain", run_copy, tmp_path / "nowhere.png", "--out", out))
    assert (out / "keep.txt").is_file()


@pytest.mark.filterwarnings("ignore:exact copies across splits", "ignore:1 group(s) of identical")
def test_check_of_blank_images_says_they_have_no_variation(tmp_path):
    images = np.zeros((40, 8, 8), dtype=np.uint8)
    table = from_arrays(images, np.arange(40) % 2, names=["a", "b"])
    result = check(table, runs_dir=str(tmp_path / "checks"), progress=False,
                            model="small_cnn_16", overfit_steps=20, sanity_steps=5)
    one_batch = next(f for f in result.findings if f.check == "one batch")
    assert one_batch.status == "fail"
    assert "the images have no variation (std 0" in one_batch.advice
    assert "check that the images are not blank" in one_batch.advice
    assert "not used by the forward pass" not in one_batch.advice


# -- as a user runs it ------------------------------------------------------------------

def test_the_installed_command_prints_one_line_and_no_traceback(run_copy, image):
    (run_copy / "config.yaml").write_text("just a string\n")
    done = subprocess.run([str(Path(sys.executable).parent / "imagefit"), "predict",
                           str(run_copy), str(image), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"imagefit: error: {run_copy / 'config.yaml'} is damaged (it holds a string, not a "
        f"mapping of keys to values): {RESTORE}"]


# -- issue 32: messages that name what is true and what the user can do --------------------

def broken_image(folder: Path) -> Path:
    path = folder / "broken.png"
    path.write_bytes(b"not an image at all")
    return path


def test_predict_says_unreadable_files_have_no_row_not_to_use_strict(run_copy, image,
                                                                     tmp_path):
    broken = broken_image(tmp_path)
    with pytest.warns(ImagefitWarning) as record:
        frame = predict(run_copy, [broken, image], progress=False)
    message = str(record[0].message)
    assert f"skipped 1 unreadable file(s): {broken} (" in message
    assert message.endswith(f"(1 file(s) have no row in the output, the first {broken})")
    assert "--strict" not in message
    assert list(frame["path"]) == [str(image)]


def test_explain_says_unreadable_files_have_no_map_not_to_use_strict(run_copy, image,
                                                                     tmp_path):
    broken = broken_image(tmp_path)
    with pytest.warns(ImagefitWarning) as record:
        written = explain(run_copy, [broken, image], tmp_path / "maps", progress=False)
    message = str(record[0].message)
    assert message.endswith(f"(1 file(s) have no map in the output, the first {broken})")
    assert "--strict" not in message and len(written) == 1


def test_fit_still_says_use_strict_for_unreadable_files(image, tmp_path):
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        shutil.copy(image, tmp_path / "data" / label / "one.png")
    broken = broken_image(tmp_path / "data" / "a")
    table = read_source(tmp_path / "data")
    with pytest.warns(ImagefitWarning, match=r"\(use --strict to stop instead\)$") as record:
        prepare_images(table, CacheSettings(size=8, channels=1), progress=False)
    assert str(broken) in str(record[0].message)


def test_csv_of_missing_absolute_paths_shows_them_in_full_not_under_the_folder(run_copy,
                                                                               tmp_path,
                                                                               capsys):
    gone = [tmp_path / "elsewhere" / f"gone{i}.png" for i in range(2)]
    csv = tmp_path / "to_predict.csv"
    csv.write_text("file\n" + "".join(f"{path}\n" for path in gone))
    line = one_error_line(*cli(capsys, "predict", run_copy, csv, "--no-progress"))
    assert line == (f"imagefit: error: to_predict.csv: 2 of 2 image paths do not exist (first: "
                    f"{gone[0]} (line 2), {gone[1]} (line 3)); check the CSV's paths and "
                    "--suffix")
    assert "under" not in line


def test_csv_of_missing_relative_paths_still_names_the_folder(run_copy, tmp_path, capsys):
    csv = tmp_path / "to_predict.csv"
    csv.write_text("file\ngone.png\n")
    line = one_error_line(*cli(capsys, "predict", run_copy, csv, "--no-progress"))
    assert line == (f"imagefit: error: to_predict.csv: 1 of 1 image paths do not exist under "
                    f"{tmp_path} (first: gone.png (line 2)); check --folder and --suffix")


@pytest.mark.parametrize("normalize", ["data", "pretrained"])
def test_normalization_of_blank_images_reports_std_0_and_fails(normalize):
    table = from_arrays(np.zeros((6, 8, 8), dtype=np.uint8), np.arange(6) % 2)
    cache = cache_arrays(table.arrays, CacheSettings(size=8, channels=1))
    mean, std = measure_channels(cache.images, np.arange(6))
    assert std == [0.0] and channel_stats(cache.images, np.arange(6))[1] == [1.0]
    finding = image_statistics(table, cache, np.arange(6), mean, std, normalize)[0]
    assert finding.check == "normalization" and finding.status == "fail"
    assert "std 0.000 (ImageNet" in finding.result and "std 1.000" not in finding.result
    assert finding.advice == ("the images have no variation (std 0): check that the images "
                              "are not blank")


def test_normalization_of_one_constant_channel_warns_naming_it():
    images = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    images[..., :2] = np.arange(6)[:, None, None, None] * 40
    table = from_arrays(images, np.arange(6) % 2)
    cache = cache_arrays(table.arrays, CacheSettings(size=8, channels=3))
    mean, std = measure_channels(cache.images, np.arange(6))
    finding = image_statistics(table, cache, np.arange(6), mean, std, "data")[0]
    assert finding.status == "warn" and finding.advice.startswith(
        "channel(s) 2 have no variation (std 0)")
