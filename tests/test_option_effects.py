"""Each training option shows its effect against a control in the same test: the value it
promises is the one the fit used (the LR finder's valley, the stop epoch patience gives, the
hand-computed weight average, the clipped norm, the smoothed loss, the reduced and grouped
rates, the frozen body, the averaged TTA outputs, the sizes, the stored threshold), and the
same fit without the option differs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

import imagefit
from conftest import shape_image, write_image
from imagefit.augment.pipeline import BatchPipeline
from imagefit.config import AugmentOptions
from imagefit.data.loader import Loader
from imagefit.data.sources import read_source
from imagefit.evaluation.inference import load_model
from imagefit.metrics import best_threshold
from imagefit.tasks import Task
from imagefit.train.learner import Learner


def digits(tmp_path, callbacks=(), **options):
    """A fit on builtin:digits, quiet, without the report."""
    settings = dict(epochs=2, runs_dir=str(tmp_path), progress=False, report=False)
    return imagefit.fit("builtin:digits", callbacks=list(callbacks), **{**settings, **options})


class Watch:
    """Runs ``record(learner)`` at one event and keeps what it returns."""

    order = 99  # after the option's own callbacks

    def __init__(self, event: str, record) -> None:
        self.values = []
        setattr(self, event, lambda learner: self.values.append(record(learner)))


# -- the learning rate ----------------------------------------------------------------------


def test_lr_auto_trains_at_the_finders_valley(tmp_path):
    sweep = imagefit.lr_find("builtin:digits", out=None, progress=False)
    valley = sweep.suggestions["valley"]
    result = digits(tmp_path, lr="auto", epochs=1)
    used = yaml.safe_load((result.run_dir / "config.yaml").read_text())["lr"]
    assert used == pytest.approx(valley, rel=1e-9)
    peak = pd.read_csv(result.run_dir / "steps.csv")["lr"].max()
    assert peak == pytest.approx(valley, rel=1e-3)  # one-cycle peaks at the rate it is given
    control = digits(tmp_path, epochs=1)  # the small-image recipe's 0.1
    assert pd.read_csv(control.run_dir / "steps.csv")["lr"].max() == pytest.approx(0.1, rel=1e-3)
    assert not valley == pytest.approx(0.1, rel=0.05)


def expected_stop(values: list[float], patience: int) -> int:
    """The epoch at which ``patience`` epochs without a new minimum have passed."""
    best, waited = math.inf, 0
    for epoch, value in enumerate(values, start=1):
        if value < best:
            best, waited = value, 0
        else:
            waited += 1
            if waited >= patience:
                return epoch
    return len(values)


def test_early_stop_ends_exactly_patience_epochs_after_the_best(tmp_path):
    common = dict(epochs=12, lr=0.5, opt="sgd")
    control = [row["valid_loss"] for row in digits(tmp_path, **common).history]
    stop = expected_stop(control, patience=2)
    assert stop < 12  # the control does have a plateau of two epochs
    stopped = [row["valid_loss"] for row in digits(tmp_path, early_stop=2, monitor="valid_loss",
                                                   **common).history]
    assert len(stopped) == stop
    assert stopped == control[:stop]  # the same fit up to there: stopping is all it changed


# -- the weights and gradients ----------------------------------------------------------------


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_ema_is_the_hand_computed_average_and_the_model_saved(tmp_path):
    start = Watch("before_fit", lambda learner: weights(learner.model))
    steps = Watch("after_step", lambda learner: weights(learner.model))
    end = Watch("after_fit", lambda learner: (weights(learner.model),
                                              weights(learner.ema.module)))
    decay = 0.9
    result = digits(tmp_path, epochs=1, ema=decay, callbacks=[start, steps, end])
    raw, averaged = end.values[-1]
    expected = start.values[0]
    for step in steps.values:  # e <- d e + (1 - d) w after every optimizer step
        expected = {name: decay * expected[name] + (1 - decay) * step[name] for name in step}
    for name in averaged:
        torch.testing.assert_close(averaged[name], expected[name], rtol=1e-4, atol=1e-5)
    saved = load_file(result.run_dir / "model.safetensors")
    for name in averaged:
        torch.testing.assert_close(saved[name], averaged[name])
    assert any(not torch.allclose(raw[name], averaged[name], atol=1e-4) for name in raw)


def mlp_learner(batch_size: int, accumulate: int) -> tuple[Learner, nn.Module]:
    """A learner on 512 digits with a model without BatchNorm, in fp32, at a constant rate:
    one step over 32 images and two accumulated steps over 16 see the same gradient."""
    table = read_source("builtin:digits")
    images = torch.from_numpy(table.arrays)
    targets = torch.as_tensor(table.targets)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train = Loader(images, targets, np.arange(512), batch_size, shuffle=True, drop_last=True,
                   seed=0, prefetch=False)
    learner = Learner(model, Task("classification", [str(i) for i in range(10)]), train, None,
                      BatchPipeline([0.3], [0.4], AugmentOptions()), optimizer="sgd",
                      weight_decay=0.0, accumulate=accumulate, precision="fp32")
    return learner, model


def test_accumulating_two_batches_steps_as_one_batch_twice_the_size():
    runs = {}
    for batch_size, accumulate in ((32, 1), (16, 2), (16, 1)):
        learner, model = mlp_learner(batch_size, accumulate)
        learner.fit(1, lambda progress: 0.05)
        runs[batch_size, accumulate] = weights(model)
    for name, value in runs[32, 1].items():
        torch.testing.assert_close(runs[16, 2][name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(runs[16, 1][n], v, atol=1e-4) for n, v in runs[32, 1].items())


def gradient_norm(learner) -> float:
    grads = [p.grad for p in learner.model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


class GradientNorms:
    """The total gradient norm as the optimizer is about to step (after any clipping)."""

    def __init__(self) -> None:
        self.norms = []

    def before_fit(self, learner) -> None:
        learner.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: self.norms.append(gradient_norm(learner)))


def test_grad_clip_bounds_the_norm_the_optimizer_steps_with(tmp_path):
    clipped, control = GradientNorms(), GradientNorms()
    digits(tmp_path, epochs=1, grad_clip=0.5, callbacks=[clipped])
    digits(tmp_path, epochs=1, callbacks=[control])
    assert len(clipped.norms) == len(control.norms) > 10
    assert max(clipped.norms) <= 0.5 * (1 + 1e-5)
    assert sum(n > 0.5 for n in control.norms) > len(control.norms) // 2


def smoothing_check(learner) -> tuple[float, float, float]:
    outputs = learner.outputs.detach().float()
    return (float(learner.loss.detach()),
            float(F.cross_entropy(outputs, learner.y, label_smoothing=0.2)),
            float(F.cross_entropy(outputs, learner.y)))


def test_label_smoothing_is_the_loss_trained_on(tmp_path):
    smoothed = Watch("after_loss", smoothing_check)
    digits(tmp_path, epochs=1, label_smoothing=0.2, callbacks=[smoothed])
    for loss, with_smoothing, without in smoothed.values:
        assert loss == pytest.approx(with_smoothing, rel=1e-5)
        assert with_smoothing > without
    plain = Watch("after_loss", smoothing_check)
    digits(tmp_path, epochs=1, label_smoothing=0.0, callbacks=[plain])
    assert all(loss == pytest.approx(without, rel=1e-5) for loss, _, without in plain.values)


# -- rates over epochs and layers -------------------------------------------------------------


def rates(learner) -> list[float]:
    """Each parameter group's rate over the schedule's value at this step."""
    scheduled = learner.step_log[-1]["lr"]
    return [group["lr"] / scheduled for group in learner.optimizer.param_groups]


def test_reduce_on_plateau_multiplies_the_rate_after_patience_epochs(tmp_path):
    factors = Watch("before_batch", lambda learner: rates(learner)[0])
    result = digits(tmp_path, epochs=10, lr=0.5, opt="sgd", schedule="flat_cos", plateau=1,
                    plateau_factor=0.5, monitor="valid_loss", callbacks=[factors])
    losses = [row["valid_loss"] for row in result.history]
    expected, best, factor = [], math.inf, 1.0
    for loss in losses:  # patience 1: every epoch without a new minimum halves the rate
        expected.append(factor)
        factor = factor if loss < best else factor * 0.5
        best = min(best, loss)
    per_epoch = len(factors.values) // len(losses)
    seen = [factors.values[epoch * per_epoch] for epoch in range(len(losses))]
    assert seen == pytest.approx(expected)
    assert min(expected) < 1.0  # it did reduce
    control = Watch("before_batch", lambda learner: rates(learner)[0])
    digits(tmp_path, epochs=2, lr=0.5, opt="sgd", schedule="flat_cos", callbacks=[control])
    assert set(control.values) == {1.0}


def test_lr_groups_give_each_layer_group_its_rate(tmp_path):
    given = [3e-4, 1e-3, 2e-3, 3e-3]
    grouped = Watch("before_batch", rates)
    digits(tmp_path, epochs=1, lr=3e-3, opt="adamw", lr_groups=given, callbacks=[grouped])
    expected = [rate / given[-1] for rate in given]  # parameter groups: 2 per layer group
    for seen in grouped.values:  # (with and without weight decay)
        assert sorted(set(np.round(seen, 9))) == pytest.approx(expected)
    control = Watch("before_batch", rates)
    digits(tmp_path, epochs=1, lr=3e-3, opt="adamw", callbacks=[control])
    assert all(set(seen) == {1.0} for seen in control.values)


def test_freeze_epochs_keep_the_body_fixed_while_the_head_learns(tmp_path):
    start = Watch("before_fit", lambda learner: weights(learner.model))
    epochs = Watch("after_epoch", lambda learner: weights(learner.model))
    digits(tmp_path, epochs=1, freeze_epochs=1, callbacks=[start, epochs])
    initial, (frozen, unfrozen) = start.values[0], epochs.values
    convs = [name for name, value in initial.items() if value.dim() == 4]
    assert convs and all(torch.equal(frozen[name], initial[name]) for name in convs)
    assert not torch.equal(frozen["head.weight"], initial["head.weight"])
    assert all(not torch.equal(unfrozen[name], initial[name]) for name in convs)
    control = Watch("after_epoch", lambda learner: weights(learner.model))
    digits(tmp_path, epochs=1, freeze_epochs=0, callbacks=[control])
    assert all(not torch.equal(control.values[0][name], initial[name]) for name in convs)


# -- evaluation -------------------------------------------------------------------------------


def test_flip_tta_figures_are_the_average_with_the_mirror_image(tmp_path):
    result = digits(tmp_path, epochs=2, tta=True, tta_augment="flip", precision="fp32")
    loaded = load_model(result.run_dir, "cpu", "fp32")
    rows, plain = result.outputs["valid"]
    table = read_source("builtin:digits")
    x = loaded.pipeline(torch.from_numpy(table.arrays[rows]).permute(0, 3, 1, 2))
    with torch.no_grad():
        ours = loaded.model(x).softmax(1)
        mirrored = loaded.model(x.flip(-1)).softmax(1)
    torch.testing.assert_close(plain.softmax(1), ours, rtol=1e-4, atol=1e-5)
    averaged = ((ours + mirrored) / 2).clamp_min(1e-12).log()
    targets = torch.as_tensor(table.targets[rows])
    assert result.metrics["valid_tta_loss"] == pytest.approx(
        loaded.task.loss(averaged, targets).item(), rel=1e-4)  # with its label smoothing
    assert result.metrics["valid_tta_accuracy"] == pytest.approx(
        (averaged.argmax(1) == targets).float().mean().item())
    assert result.metrics["valid_tta_loss"] != pytest.approx(result.metrics["valid_loss"],
                                                             rel=1e-3)
    control = digits(tmp_path, epochs=2, tta=False, precision="fp32")
    assert "valid_tta_loss" not in control.metrics


def test_each_progressive_size_reaches_the_model(tmp_path):
    sizes = Watch("before_batch", lambda learner: (len(learner.history), learner.x.shape[-1]))
    digits(tmp_path, epochs=4, image_sizes=[8, 16], callbacks=[sizes])
    per_epoch = {epoch: size for epoch, size in sizes.values}
    assert per_epoch == {0: 8, 1: 8, 2: 16, 3: 16}
    assert {size for _, size in sizes.values} == {8, 16}
    control = Watch("before_batch", lambda learner: learner.x.shape[-1])
    digits(tmp_path, epochs=1, callbacks=[control])
    assert set(control.values) == {8}


def test_the_threshold_chosen_on_validation_is_the_one_predict_applies(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    tags = {0: "square;bright", 1: "bar", 2: "bar;vertical"}
    rows = ["file,tags"]
    for i in range(90):
        kind = i % 3
        write_image(folder / f"im{i}.png", shape_image(kind, 16, rng, rgb=False))
        rows.append(f"im{i}.png,{tags[kind]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    result = imagefit.fit(folder / "labels.csv", epochs=2, runs_dir=str(tmp_path / "runs"),
                          progress=False, report=False)
    valid_rows, outputs = result.outputs["valid"]
    info = json.loads((result.run_dir / "model.json").read_text())
    task = Task.from_dict(info["task"])
    targets = torch.as_tensor(read_source(folder / "labels.csv").targets[valid_rows])
    chosen, _ = best_threshold(task, outputs, targets)
    assert info["task"]["threshold"] == pytest.approx(chosen)
    predicted = {}
    for threshold in (info["task"]["threshold"], 0.02, 0.98):
        info["task"]["threshold"] = threshold
        (result.run_dir / "model.json").write_text(json.dumps(info))
        frame = imagefit.predict(result.run_dir, [folder], progress=False)
        probabilities = frame[[f"prob_{name}" for name in task.names]].to_numpy()
        expected = [";".join(n for n, p in zip(task.names, row) if p >= threshold)
                    for row in probabilities]
        predicted[threshold] = frame["labels"].fillna("").tolist()
        assert predicted[threshold] == expected
    assert predicted[0.02] != predicted[0.98]  # the threshold read is the one applied
