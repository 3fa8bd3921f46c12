"""Speed switches: --compile, --channels-last, --bs auto, and carrying on after running out of
GPU memory (simulated on the CPU by raising CUDA's error)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

import imagefit
from imagefit import ImagefitError, ImagefitWarning
from imagefit.augment.pipeline import BatchPipeline
from imagefit.config import AugmentOptions, FitConfig
from imagefit.data.loader import Loader
from imagefit.models.small import SmallCNN
from imagefit.tasks import Task
from imagefit.train.learner import Learner
from imagefit.train.memory import largest_batch_size
from imagefit.workflows.build import choose_batch_size

N_IMAGES = 32


def make_learner(batch_size: int = 8, **options) -> Learner:
    """A tiny SmallCNN on 32 random 16 px RGB images of 3 classes, seeded."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 16, 16, 3), dtype=torch.uint8,
                           generator=generator)
    targets = torch.randint(0, 3, (N_IMAGES,), generator=generator)
    torch.manual_seed(0)
    model = SmallCNN(3, 3, widths=(8, 16)).to(memory_format=torch.channels_last)
    train = Loader(images, targets, np.arange(N_IMAGES), batch_size, shuffle=True,
                   drop_last=True, prefetch=False)
    valid = Loader(images, targets, np.arange(8), 8, prefetch=False)
    return Learner(model, Task("classification", ["a", "b", "c"]), train, valid,
                   BatchPipeline([0.5] * 3, [0.25] * 3, AugmentOptions()), **options)


def constant(lr: float):
    return lambda progress: lr


def train_frozen_then_all(learner: Learner) -> list[float]:
    learner.freeze()
    learner.fit(1, constant(1e-2))
    learner.unfreeze()
    learner.fit(1, constant(1e-2))
    return [float(row["loss"]) for row in learner.step_log]


def test_compile_trains_like_eager_with_freezing_and_ema():
    if shutil.which("g++") is None:
        pytest.skip("torch.compile's inductor backend needs a C++ compiler (g++) on the CPU")
    eager = make_learner(ema_decay=0.9)
    compiled = make_learner(ema_decay=0.9, compile=True)
    eager_losses = train_frozen_then_all(eager)
    compiled_losses = train_frozen_then_all(compiled)  # compiles twice: frozen, then not
    # fp32 kernels that sum in another order: measured 1.3e-6 relative over these 8 steps,
    # 6e-6 on the averaged weights
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled.history[-1]["valid_loss"] == pytest.approx(
        eager.history[-1]["valid_loss"], rel=1e-4)
    saved = compiled.checkpoint_state()
    assert list(saved["model"]) == list(eager.model.state_dict())  # no _orig_mod. prefix
    for name, value in saved["ema"].items():
        torch.testing.assert_close(value, eager.ema.module.state_dict()[name],
                                   rtol=1e-4, atol=5e-5)


def test_channels_last_switch_sets_the_input_memory_format():
    seen = []
    for channels_last in (True, False):
        learner = make_learner(channels_last=channels_last)
        learner.model.register_forward_pre_hook(lambda module, args: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
            and not args[0].is_contiguous()))
        learner.fit(1, constant(1e-3))
        assert set(seen) == {channels_last}
        seen.clear()


def test_bs_auto_on_the_cpu_is_the_default_with_a_note(capsys):
    model = SmallCNN(1, 3, widths=(8, 16))
    assert choose_batch_size(FitConfig(bs="auto"), model, (1, 16, 16), 100_000) == (128, 1.0)
    assert "bs auto: 128, the default" in capsys.readouterr().out
    assert choose_batch_size(FitConfig(bs="auto"), model, (1, 16, 16), 1000) == (16, 1.0)
    assert choose_batch_size(FitConfig(bs=256), model, (1, 16, 16), 100_000) == (256, 1.0)
    assert FitConfig(bs="auto").bs == "auto"
    with pytest.raises(ImagefitError, match="option --bs: .*at least 1, or auto"):
        imagefit.fit("builtin:digits", bs=0)


def test_largest_batch_size_halves_until_the_step_fits(monkeypatch):
    model = SmallCNN(1, 3, widths=(8, 16))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    forward = model.forward

    def limited(x):
        if len(x) > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x)

    monkeypatch.setattr(model, "forward", limited)
    assert largest_batch_size(model, (1, 16, 16), 1024) == 64
    for name, value in model.state_dict().items():  # the probe's steps were undone
        torch.testing.assert_close(value, before[name])
    assert all(p.grad is None for p in model.parameters())


def fail_at_call(model, call: int, error: Exception) -> list[int]:
    """Make ``model``'s forward raise ``error`` on its ``call``-th call; returns the batch
    sizes of the calls."""
    forward, sizes = model.forward, []

    def failing(x):
        sizes.append(len(x))
        if len(sizes) == call:
            raise error
        return forward(x)

    model.forward = failing
    return sizes


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"),
                                   RuntimeError("HIP error: out of memory (simulated)")])
def test_out_of_memory_halves_the_batch_and_the_lr_and_carries_on(error):
    learner = make_learner(batch_size=8)
    learner.valid_loader = None
    sizes = fail_at_call(learner.model, 2, error)
    with pytest.warns(ImagefitWarning, match="out of memory with batches of 8 images: training "
                      "goes on with batches of 4"):
        learner.fit(2, constant(1e-2))
    # epoch 1: a batch of 8, the failed one, then its two halves and two more split batches;
    # epoch 2: batches of 4 from the loader
    assert sizes == [8, 8] + [4] * 6 + [4] * 8
    assert learner.train_loader.batch_size == 4 and len(learner.train_loader) == 8
    assert learner.lr_factor == 0.5
    assert all(group["lr"] == pytest.approx(5e-3) for group in learner.optimizer.param_groups)
    assert learner.train_images == 2 * N_IMAGES  # every image of both epochs was trained on
    assert len(learner.step_log) == learner.step == 7 + 8
    assert all("loss" in row for row in learner.step_log)
    assert learner.checkpoint_state()["batch_size"] == 4


def test_out_of_memory_with_a_batch_of_one_is_an_error():
    learner = make_learner(batch_size=1)
    learner.valid_loader = None
    fail_at_call(learner.model, 1, torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(ImagefitError, match="out of memory with a batch of one image"):
        learner.fit(1, constant(1e-2))


def test_fit_with_the_speed_options_records_them(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 50, (40, 12, 12), dtype=np.uint8)
    labels = np.arange(40) % 2
    images[labels == 1, 3:9, 3:9] = 220
    table = imagefit.from_arrays(images, labels, names=["empty", "square"])
    result = imagefit.fit(table, epochs=1, bs="auto", channels_last=False, runs_dir=str(tmp_path),
                          progress=False, report=False, tta=False)
    assert "bs auto: 8, the default" in capsys.readouterr().out  # 32 rows: 8 for 4 steps
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert (config["bs"], config["batch_size_used"], config["channels_last"],
            config["compile"]) == ("auto", 8, False, False)
    assert result.model.stages[0][0].weight.is_contiguous()
