"""A run directory whose files were damaged or edited gives one line naming the file and what
to do (never advice to unpickle); a run being written is locked; a fit that fails after its
run directory exists says so there; Ctrl-C before the first epoch leaves nothing behind."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import imagefit
from conftest import isolated
from imagefit import runs
from imagefit.cli import main
from imagefit.errors import FitInterrupted, ImagefitError
from imagefit.report.history import list_runs
from imagefit.train.callbacks import Callback


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-epoch digits run, copied afresh by ``run_copy`` for each test."""
    root = tmp_path_factory.mktemp("trained")
    with isolated(root / "cache"):
        result = imagefit.fit("builtin:digits", epochs=2, runs_dir=str(root / "runs"),
                              progress=False, report=False)
    return result.run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    target = tmp_path / trained.name
    shutil.copytree(trained, target)
    return target


def predict_error(run: Path, tmp_path: Path) -> str:
    image = tmp_path / "one.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    with pytest.raises(ImagefitError) as caught:
        imagefit.predict(run, [image], progress=False)
    return str(caught.value)


def test_truncated_weights_name_the_file(run_copy, tmp_path):
    weights = run_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    message = predict_error(run_copy, tmp_path)
    assert f"{weights} is damaged" in message and "restore it from a copy" in message


def test_pickled_weights_in_place_of_safetensors_are_damaged_not_loaded(run_copy, tmp_path):
    torch.save({"weight": torch.zeros(3)}, run_copy / "model.safetensors")
    message = predict_error(run_copy, tmp_path)
    assert "model.safetensors is damaged" in message and "weights_only" not in message


def test_empty_model_json_is_named(run_copy, tmp_path):
    (run_copy / "model.json").write_text("")
    assert "model.json is damaged (it is empty): restore it" in predict_error(run_copy, tmp_path)


@pytest.mark.parametrize("edit, expected", [
    (lambda info: info["task"].update(kind="images"), r"does not describe a model \(task.kind"),
    (lambda info: info.pop("normalization"), r"does not describe a model \(normalization: "
                                              r"field required"),
    (lambda info: info.update(channels=7), r"does not describe a model \(channels"),
    (lambda info: info.update(architecture="resnet_nope"), r"names a model that cannot be made"),
    (lambda info: info.update(architecture="small_cnn"), r"does not hold the weights model.json "
                                                         r"describes"),
    (lambda info: info["normalization"].update(std=[0.0]), r"normalization.std"),
])
def test_edited_model_json_is_one_clear_line(run_copy, tmp_path, edit, expected):
    info = json.loads((run_copy / "model.json").read_text())
    edit(info)
    (run_copy / "model.json").write_text(json.dumps(info))
    message = predict_error(run_copy, tmp_path)
    assert re.search(expected, message), message
    assert "model.json" in message


def test_nan_weights_are_refused(run_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(run_copy / "model.safetensors")
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, run_copy / "model.safetensors")
    # saved by a fit, so model.json records their checksum (edited weights: test_damaged_files)
    info = json.loads((run_copy / "model.json").read_text())
    info[runs.WEIGHTS_CHECKSUM] = runs.file_sha256(run_copy / "model.safetensors")
    (run_copy / "model.json").write_text(json.dumps(info))
    assert "holds NaN or infinite weights: its fit diverged" in predict_error(run_copy, tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage bytes", b"PK\x03\x04broken zip"])
def test_corrupt_checkpoint_cannot_be_resumed_with_one_line(run_copy, content):
    (run_copy / "checkpoints" / "last.pt").write_bytes(content)
    with pytest.raises(ImagefitError, match=r"last.pt is not a training checkpoint imagefit can "
                       r"read .* cannot be resumed; the run's model.safetensors still holds"):
        imagefit.resume(run_copy)


class Payload:
    """Stands for code someone hid in a checkpoint: loading must never run it."""


def test_pickled_checkpoint_is_refused_without_advice_to_unpickle(run_copy):
    torch.save({"model": Payload()}, run_copy / "checkpoints" / "last.pt")
    with pytest.raises(ImagefitError) as caught:
        imagefit.resume(run_copy)
    message = str(caught.value)
    assert "it holds Python objects, which are never unpickled" in message
    assert "weights_only" not in message and "trust" not in message


def test_checkpoint_of_another_shape_is_refused(run_copy):
    torch.save({"weights": torch.zeros(2)}, run_copy / "checkpoints" / "last.pt")
    with pytest.raises(ImagefitError, match=r"not a training checkpoint of imagefit \(keys "
                       r"missing\)"):
        imagefit.resume(run_copy)


@pytest.mark.parametrize("text, expected", [
    ("data: [unclosed", r"config.yaml is damaged \(not readable YAML\)"),
    ("- a list\n", r"does not hold the options of a fit \(no 'data' key\)"),
    ("data: builtin:digits\nlr: fast\n", r"config.yaml: option --lr: give a positive number"),
])
def test_damaged_config_cannot_be_resumed(run_copy, text, expected):
    (run_copy / "config.yaml").write_text(text)
    with pytest.raises(ImagefitError, match=expected):
        imagefit.resume(run_copy)


def test_resume_of_a_missing_run_names_it(tmp_path):
    with pytest.raises(ImagefitError, match=r"run .*nowhere not found: give a run directory"):
        imagefit.resume(tmp_path / "nowhere")


# -- the lock -----------------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.seek(0); handle.truncate()
handle.write(f"process {os.getpid()} (imagefit fit ...)\\n"); handle.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_being_written_cannot_be_resumed_and_a_dead_owner_does_not_block(run_copy):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_copy / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ImagefitError, match=rf"is being written by process {holder.pid} "
                           r"\(imagefit fit ...\): wait for that fit to end, or stop it"):
            imagefit.resume(run_copy)
        (run_copy / "metrics.json").unlink()
        assert list_runs(run_copy.parent).set_index("run").loc[run_copy.name, "status"] == \
            "running"
    finally:
        holder.kill()
        holder.wait()
    result = imagefit.resume(run_copy)  # the lock died with its process
    assert result.metrics["status"] == "done"


# -- failures after the run directory exists ----------------------------------------------


class FailInSecondEpoch(Callback):
    def after_batch(self, learner):
        if learner.epoch == 1:
            raise ImagefitError("out of memory with a batch of one image: choose a smaller "
                                "--model")


def test_an_error_after_the_first_epoch_marks_the_run_failed(tmp_path):
    with pytest.raises(ImagefitError, match="out of memory"):
        imagefit.fit("builtin:digits", epochs=3, runs_dir=str(tmp_path), progress=False,
                     callbacks=[FailInSecondEpoch()])
    run_dir = next(tmp_path.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["epochs"] == 1
    assert "out of memory" in metrics["error"]
    assert "failed: out of memory" in (run_dir / "log.txt").read_text()
    assert list_runs(tmp_path)["status"].tolist() == ["failed"]


class InterruptAtFirstBatch(Callback):
    def after_batch(self, learner):
        raise KeyboardInterrupt


def test_ctrl_c_before_the_first_epoch_keeps_nothing(tmp_path, capsys):
    with pytest.raises(FitInterrupted) as caught:
        imagefit.fit("builtin:digits", epochs=2, runs_dir=str(tmp_path), progress=False,
                     callbacks=[InterruptAtFirstBatch()])
    assert caught.value.run_dir is None and caught.value.epochs_done == 0
    assert list(tmp_path.iterdir()) == []


def test_cli_says_nothing_was_kept_after_an_early_ctrl_c(tmp_path, capsys, monkeypatch):
    import imagefit.api as api

    def interrupted(*args, **kwargs):
        raise FitInterrupted(None, 0)

    monkeypatch.setattr(api, "fit", interrupted)
    assert main(["fit", "builtin:digits", "--runs-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first epoch finished: nothing was kept" in err
    assert "keeps its model" not in err


def test_a_run_directory_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    runs_file = tmp_path / "runs"
    runs_file.write_text("not a folder")
    assert main(["fit", "builtin:digits", "--runs-dir", str(runs_file), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "imagefit: error: --runs-dir " + str(runs_file) + " is a file: give a folder" in \
        captured.err
    assert "epoch" not in captured.out  # refused before any training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_damaged_run_files_do_not_break_the_listing(run_copy):
    (run_copy / "config.yaml").write_text("data: [unclosed")
    frame = list_runs(run_copy.parent)
    assert frame.set_index("run").loc[run_copy.name, "status"] == "unreadable"


def test_predict_out_naming_a_folder_is_refused_and_leaves_nothing(run_copy, tmp_path, capsys):
    folder = tmp_path / "preds"
    folder.mkdir()
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    assert main(["predict", str(run_copy), str(image), "--out", str(folder)]) == 2
    assert f"--out {folder} is a folder: give a file name" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_config_yaml_is_still_plain_yaml(trained):
    assert yaml.safe_load((trained / "config.yaml").read_text())["data"] == "builtin:digits"


def test_resuming_removes_what_a_killed_write_left(run_copy):
    (run_copy / ".model.k2j3.safetensors").write_bytes(b"half a model")
    (run_copy / "checkpoints" / ".last.x8f1").write_bytes(b"half a checkpoint")
    (run_copy / "metrics.json").unlink()
    imagefit.resume(run_copy)
    left = [p.name for p in [*run_copy.glob(".*"), *(run_copy / "checkpoints").glob(".*")]]
    assert left == [".lock"]
