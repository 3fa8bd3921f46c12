"""The small-image recipe: the defaults it fills in, what it leaves to the user, the net it
picks for a budget, and the mirror-image TTA."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import yaml

from imagefit import api, models
from imagefit.augment.pipeline import BatchPipeline
from imagefit.config import AugmentOptions, FitConfig, ShowBatchOptions
from imagefit.forward import TTA, model_outputs
from imagefit.models import create_model, default_model_name
from imagefit.tasks import Task, task_class
from imagefit.train import step as train_step
from imagefit.train.callbacks.base import Callback
from imagefit.train.step import net_for_budget
from imagefit.workflows.recipes import apply_small_image_recipe


def test_small_images_get_the_recipe_for_what_is_unset():
    for cfg in (FitConfig(epochs=10), FitConfig(budget="2m")):
        apply_small_image_recipe(cfg, 28)
        assert (cfg.opt, cfg.lr, cfg.wd) == ("sgd", 0.1, 5e-4)
        assert (cfg.augment, cfg.label_smoothing, cfg.tta_augment) == ("light", 0.1, "flip")


def test_fits_of_under_10_epochs_train_without_augmentation_or_tta():
    for cfg in (FitConfig(), FitConfig(epochs=9)):  # 5 epochs, 9
        apply_small_image_recipe(cfg, 28)
        assert (cfg.opt, cfg.augment, cfg.tta, cfg.label_smoothing) == ("sgd", "none", False,
                                                                        0.1)


def test_images_under_16_px_train_without_augmentation_or_tta():
    cfg = FitConfig()
    apply_small_image_recipe(cfg, 8)
    assert (cfg.opt, cfg.augment, cfg.tta, cfg.label_smoothing) == ("sgd", "none", False, 0.1)
    cfg = FitConfig(augment="light", tta=True)
    apply_small_image_recipe(cfg, 8)
    assert cfg.augment == "light" and cfg.tta


def test_the_users_choices_stand():
    cfg = FitConfig(opt="adamw", augment="none", label_smoothing=0.0, epochs=10)
    apply_small_image_recipe(cfg, 28)
    assert (cfg.opt, cfg.lr, cfg.wd) == ("adamw", 3e-3, 0.05)  # its own optimizer's defaults
    assert cfg.augment == "none" and cfg.label_smoothing == 0.0
    assert cfg.tta_augment == "flip"


@pytest.mark.parametrize("options, size, kind", [
    ({}, 64, "classification"), ({"model": "resnet18"}, 28, "classification"),
    ({"pretrained": "timm"}, 28, "classification"), ({}, 28, "regression"),
    ({}, 28, "multilabel")])
def test_no_recipe_for_larger_images_timm_models_pretrained_weights_or_other_tasks(
        options, size, kind):
    cfg = FitConfig(**options)
    apply_small_image_recipe(cfg, size, task_class(kind).single_label)
    assert (cfg.opt, cfg.augment, cfg.label_smoothing) == ("adamw", "none", 0.0)


def test_show_batch_shows_the_recipes_augmentation():
    options = ShowBatchOptions()
    apply_small_image_recipe(options, 28)
    assert options.augment == "light"


def test_the_net_by_image_size_and_budget():
    assert default_model_name(28) == "small_cnn_16"
    assert default_model_name(32) == "small_cnn_16"
    assert default_model_name(64) == "resnet18"
    # the recipe was measured on single-label classification
    assert default_model_name(28, single_label=False) == "small_cnn"
    for name in ("small_cnn_16", "small_cnn_32", "small_cnn_64", "small_cnn"):
        model = create_model(name, 1, 10)
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_flip_tta_averages_the_image_and_its_mirror_whatever_tta_n():
    cfg = FitConfig(tta_augment="flip", tta_n=4)
    tta = TTA.from_options(cfg, AugmentOptions())
    assert tta.n == 1 and tta.augment == AugmentOptions(flip=1.0)
    torch.manual_seed(0)
    model = create_model("small_cnn_16", 1, 3).eval()
    images = torch.randint(0, 256, (6, 12, 12, 1), dtype=torch.uint8)
    task = Task("classification", ["a", "b", "c"])
    pipeline = BatchPipeline([0.5], [0.25])
    rows = torch.arange(6).numpy()
    plain, averaged = model_outputs(model, pipeline, task, images, rows, 4, tta,
                                    plain_too=True)
    x = pipeline(images.permute(0, 3, 1, 2))
    with torch.no_grad():
        expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
        assert torch.allclose(plain, model(x), atol=1e-5)
    assert torch.allclose(averaged.exp(), expected, atol=1e-5)


def test_one_tta_pass_gives_regression_its_plain_outputs_unchanged():
    torch.manual_seed(0)
    model = create_model("small_cnn_16", 1, 1).eval()
    images = torch.randint(0, 256, (5, 12, 12, 1), dtype=torch.uint8)
    task, pipeline = Task("regression", ["age"]), BatchPipeline([0.5], [0.25])
    rows = torch.arange(5).numpy()
    tta = TTA(1, AugmentOptions(flip=1.0))
    plain, averaged = model_outputs(model, pipeline, task, images, rows, 8, tta,
                                    plain_too=True)
    assert torch.allclose(plain, model_outputs(model, pipeline, task, images, rows, 8))
    x = pipeline(images.permute(0, 3, 1, 2))
    with torch.no_grad():
        assert torch.allclose(averaged, (model(x) + model(x.flip(-1))) / 2, atol=1e-5)


class PipelineSeen(Callback):
    """Records the training augmentation of the last batch."""

    def after_batch(self, learner) -> None:
        self.augment = learner.pipeline.augment


def test_a_budget_holding_enough_epochs_of_the_wider_net_trains_it(monkeypatch):
    """net_for_budget estimates the epochs of small_cnn_32 in the seconds left from its timed
    steps (stood in for here): from WIDER_FROM_EPOCHS on, the wider net."""
    per_second = 1000.0
    monkeypatch.setattr(train_step, "training_images_per_second", lambda *a, **k: per_second)
    seconds = models.WIDER_FROM_EPOCHS * 50_000 / (per_second * models.TRAINING_SHARE)
    shape, cpu = (1, 28, 28), torch.device("cpu")
    name, epochs = net_for_budget("small_cnn_16", seconds, 50_000, shape, 10, cpu)
    assert name == "small_cnn_32" and epochs == pytest.approx(models.WIDER_FROM_EPOCHS)
    assert net_for_budget("small_cnn_16", seconds * 0.99, 50_000, shape, 10, cpu)[0] == \
        "small_cnn_16"
    assert net_for_budget("small_cnn_16", seconds / 2, 50_000, shape, 10, cpu,
                          world_size=2)[0] == "small_cnn_32"  # two ranks share the epoch


def steps_timed_here(name: str, shape: tuple[int, int, int], batch_size: int,
                     steps: int = 20) -> float:
    """Images a second of ``steps`` training steps of the fit's own net (channels-last, as
    the learner trains it), timed here after two untimed ones."""
    model = create_model(name, shape[0], 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, *shape).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (batch_size,))
    for step in range(steps + 2):
        if step == 2:
            started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - started)


def test_timing_a_net_gives_its_training_speed():
    """training_images_per_second's figure for small_cnn_32 is the rate its training steps
    run at, timed here independently: within a factor of 2 either way. Both on one thread
    (two thrash on this 2-core machine shared with other jobs), alternated three times and
    compared by their medians, so a burst of load elsewhere falls on both. Measured here
    under a load average of 10: ratios 0.83-1.17 over 8 repeats (on two threads 0.69-2.47)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        figures, timed_here = [], []
        for _ in range(3):
            figures.append(train_step.training_images_per_second(
                create_model("small_cnn_32", 1, 10), (1, 28, 28), 10, torch.device("cpu"),
                batch_size=16))
            timed_here.append(steps_timed_here("small_cnn_32", (1, 28, 28), 16))
    finally:
        torch.set_num_threads(threads)
    ratio = statistics.median(figures) / statistics.median(timed_here)
    assert 0.5 <= ratio <= 2.0, (figures, timed_here)


@pytest.mark.parametrize("from_epochs, off", [(10**6, True), (0, False)])
def test_a_budget_fit_decides_augmentation_at_its_first_plan(
        class_folder, tmp_path, monkeypatch, capsys, from_epochs, off):
    """Under --budget the fit's length is known only at the first plan: a plan shorter than
    AUGMENT_FROM_EPOCHS turns the recipe's augmentation and TTA off from then on (the
    threshold is moved here to make this fit short or long), and config.yaml, metrics.json
    and a printed line say so; the user's own --augment or --tta is left alone. Before
    that, the net: small_cnn_32 when the budget holds WIDER_FROM_EPOCHS epochs of it (moved
    here too), else small_cnn_16."""
    import imagefit.workflows.fit as fit_module

    monkeypatch.setattr(fit_module, "AUGMENT_FROM_EPOCHS", from_epochs)
    monkeypatch.setattr(models, "WIDER_FROM_EPOCHS", 10**9 if off else 0)
    seen = PipelineSeen()
    result = api.fit(str(class_folder), budget="10s", runs_dir=str(tmp_path / "runs"),
                     progress=False, report=False, callbacks=[seen])
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert (config["augment"], config["tta"]) == (("none", False) if off else ("light", True))
    assert (seen.augment == AugmentOptions()) == off  # what the last batch trained with
    assert any(k.startswith("valid_tta_") for k in result.metrics) != off
    decided = result.metrics["augmentation_decided"]
    assert decided["augmentation"] == (not off) and decided["planned_epochs"] > 0
    printed = capsys.readouterr().out
    assert ("augmentation off: " in printed) == off
    wider = not off
    assert config["model"] == ("small_cnn_32" if wider else "small_cnn_16")
    assert result.metrics["net_by_budget"]["chosen"] == config["model"]
    assert result.metrics["net_by_budget"]["estimated_epochs"] > 0
    assert ("model auto: small_cnn_32, as the budget holds about " in printed) == wider
    for users in ({"augment": "light"}, {"tta": True}, {"augment": "none"}):
        assert not apply_small_image_recipe(FitConfig(budget="10s", **users), 28)
    assert apply_small_image_recipe(FitConfig(budget="10s"), 28)
    assert not apply_small_image_recipe(FitConfig(epochs=20), 28)
