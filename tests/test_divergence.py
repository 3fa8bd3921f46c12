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


class Bf16Fault(Callback):
    """Stands in for a faulty bf16 kernel (torch 2.14's oneDNN on CPUs with AMX): at step
    ``at``, NaN in the model's output or in one weight's gradient, under bf16 autocast only,
    so that the step computed again in fp32 is finite."""

    def __init__(self, at: int, where: str) -> None:
        self.at, self.where, self.faults, self.handles, self.losses = at, where, 0, [], []

    def before_fit(self, learner):
        model = learner.model
        self.handles = [model.register_forward_hook(self.poison_output)]
        first = next(p for p in model.parameters() if p.requires_grad)
        self.handles.append(first.register_hook(self.poison_gradient))
        self.learner, self.steps = learner, len(learner.train_loader)

    def after_batch(self, learner):
        self.losses.append(float(learner.loss.detach()))

    def after_fit(self, learner):
        for handle in self.handles:
            handle.remove()

    def fault_now(self, where: str) -> bool:
        bf16 = torch.is_autocast_enabled("cpu") and \
            torch.get_autocast_dtype("cpu") == torch.bfloat16
        if where == "gradient":  # the backward of a bf16 forward runs outside autocast
            bf16 = self.learner.outputs is not None and self.learner.outputs.dtype == \
                torch.bfloat16
        return where == self.where and bf16 and self.learner.step == self.at

    def poison_output(self, module, inputs, output):
        if self.fault_now("output"):
            self.faults += 1
            return output * float("nan")
        return None

    def poison_gradient(self, grad):
        if self.fault_now("gradient"):
            self.faults += 1
            return grad * float("nan")
        return None


@pytest.mark.parametrize("where", ["output", "gradient"])
def test_a_bf16_fault_that_fp32_does_not_repeat_is_computed_again_and_counted(tmp_path, where):
    fault = Bf16Fault(at=5, where=where)
    with pytest.warns(ImagefitWarning, match=r"bf16 arithmetic gave a non-finite loss or "
                      r"gradient at step 6: the step was computed in fp32"):
        result = imagefit.fit("builtin:digits", epochs=1, precision="bf16", progress=False,
                              runs_dir=str(tmp_path), report=False, callbacks=[fault])
    assert fault.faults == 1
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["bf16_steps_redone_in_fp32"] == 1
    assert len(fault.losses) == fault.steps  # every step, finite
    assert all(math.isfinite(loss) for loss in fault.losses)
    assert metrics["valid_accuracy"] > 0.8  # it trained on: a NaN step would have stopped it
    weights = load_file(result.run_dir / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_a_nan_that_fp32_repeats_is_a_divergence_in_bf16_too(tmp_path):
    with pytest.raises(TrainingDiverged, match="training loss became NaN or infinite at step"):
        imagefit.fit("builtin:digits", epochs=3, precision="bf16", runs_dir=str(tmp_path),
                     progress=False, callbacks=[BlowUpInSecondEpoch()])
