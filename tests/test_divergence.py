"""A fit whose loss or weights stop being finite stops at once with one line (where, and the
likely cause), exits non-zero, keeps the last finished epoch's finite model and is marked
failed; options that cannot give a finite fit are refused before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import imagefit
from imagefit.cli import main
from imagefit.devices import resolve_precision
from imagefit.errors import ImagefitError, ImagefitWarning, TrainingDiverged
from imagefit.report.history import list_runs
from imagefit.train.callbacks import Callback


class BlowUpInSecondEpoch(Callback):
    """Multiplies the learning rate by 1e12 from the second epoch on."""

    def before_epoch(self, learner):
        if learner.epoch == 1:
            learner.lr_factor = 1e12


def test_divergence_keeps_the_last_finite_epoch_and_marks_the_run_failed(tmp_path):
    with pytest.raises(TrainingDiverged) as caught:
        imagefit.fit("builtin:digits", epochs=3, runs_dir=str(tmp_path), progress=False,
                     callbacks=[BlowUpInSecondEpoch()])
    message = str(caught.value)
    assert "training diverged: the training loss became NaN or infinite at step" in message
    assert "of epoch 2" in message and "learning rate" in message and "too high" in message
    run_dir = next(tmp_path.iterdir())
    assert f"{run_dir} keeps epoch 1, the last finished one" in message
    weights = load_file(run_dir / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert json.loads((run_dir / "model.json").read_text())["epochs_trained"] == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["epochs"] == 1
    assert math.isfinite(metrics["valid_accuracy"])
    assert list_runs(tmp_path)["status"].tolist() == ["failed"]
    assert (run_dir / "checkpoints" / "last.pt").is_file()  # epoch 1, finite, resumable


def test_a_huge_learning_rate_exits_non_zero_without_nan_weights(tmp_path, capsys):
    code = main(["fit", "builtin:digits", "--lr", "1e6", "--epochs", "2", "--runs-dir",
                 str(tmp_path), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("imagefit: error: training diverged: the training loss became NaN "
                          "or infinite at step ")
    assert "give a lower --lr (e.g. a tenth) or --lr auto" in err
    run_dir = next(tmp_path.iterdir())
    assert not (run_dir / "model.safetensors").exists()  # no epoch finished: no model at all
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
    assert "marked failed (no epoch finished)" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "abc"])
def test_learning_rates_that_cannot_train_are_refused(value, capsys):
    assert main(["fit", "builtin:digits", "--lr", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagefit: error: option --lr: give a positive number such as 3e-3, "
                          "or auto (got ")
    assert "lr.float" not in err and "literal" not in err


def test_non_finite_values_of_any_number_option_are_refused():
    with pytest.raises(ImagefitError, match=r"option --wd: input should be a finite number"):
        imagefit.fit("builtin:digits", wd=float("nan"))
    with pytest.raises(ImagefitError, match=r"option --lr-groups: input should be a finite"):
        imagefit.fit("builtin:digits", lr_groups=[1e-3, float("inf")])


def test_fp16_on_a_cpu_falls_back_to_fp32_with_a_line(tmp_path):
    with pytest.warns(ImagefitWarning, match=r"--precision fp16 on a CPU runs about 16x slower "
                      r"than fp32 .* training in fp32 instead"):
        assert resolve_precision("fp16", torch.device("cpu")) == "fp32"
    with pytest.warns(ImagefitWarning, match="fp16 on a CPU"):
        result = imagefit.fit("builtin:digits", epochs=1, precision="fp16",
                              runs_dir=str(tmp_path), progress=False, report=False)
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["precision"] == "fp32"


def test_fp16_overflow_is_named_as_the_cause():
    from imagefit.train.learner import Learner

    learner = Learner.__new__(Learner)  # only the message is under test here
    learner.history, learner.precision = [], "fp16"
    learner.train_loader = [0] * 10
    message = str(learner.diverged(12, "the training loss"))
    assert "at step 3 of epoch 1" in message
    assert "fp16 arithmetic overflowed (its largest number is 65504): train with --precision " \
        "bf16 or fp32" in message
