"""Feature maps: the captured activations are the layer's own output, the grid PNG has the
documented size, ``explain --method feature-maps`` writes it, an unknown layer is one line,
and report.html shows the first validation image's maps and the model summary."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import imagefit
from conftest import isolated
from imagefit import ImagefitError, cli
from imagefit.augment.pipeline import BatchPipeline
from imagefit.data.cache import CacheSettings
from imagefit.evaluation.feature_maps import default_feature_layer, feature_maps
from imagefit.evaluation.inference import LoadedModel, load_model
from imagefit.models import create_model
from imagefit.report.feature_maps import (
    CELL_PX,
    COLUMNS,
    HEADER_PX,
    MAX_CHANNELS,
    grid_size,
    save_feature_map_grid,
)
from imagefit.report.html import write_report
from imagefit.report.model_summary import save_model_summary
from imagefit.tasks import Task

VIRIDIS_YELLOW = np.array([253, 231, 37])  # viridis at 1: each channel's maximum


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One epoch of the default small CNN on the 8 px digits, with its report."""
    root = tmp_path_factory.mktemp("feature_maps")
    with isolated(root):
        result = imagefit.fit("builtin:digits", epochs=1, progress=False,
                              runs_dir=str(root / "runs"))
    return result.run_dir


@pytest.fixture
def digit_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=generator)


def test_capture_is_the_named_layers_own_output(digits_run, digit_images):
    loaded = load_model(digits_run, "cpu", "fp32")
    model = loaded.model
    assert default_feature_layer(model) == "stages.0"
    x = loaded.pipeline(digit_images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = model.stages[0](x)
        second_conv = model.stages[1][0](first)
    for layer, direct in ((None, first), ("stages.0", first), ("stages.1.0", second_conv)):
        maps = feature_maps(loaded, digit_images, layer, batch_size=2)  # batches of 2, 2, 1
        assert maps.shape == direct.shape and maps.dtype == torch.float32
        torch.testing.assert_close(maps, direct)
    assert maps.shape == (5, 32, 4, 4)


def test_capture_leaves_the_model_as_it_was_and_refuses_flat_outputs(digits_run,
                                                                     digit_images):
    loaded = load_model(digits_run, "cpu", "fp32")
    loaded.model.train()
    feature_maps(loaded, digit_images)
    assert all(module.training for module in loaded.model.modules())
    assert not loaded.model.stages[0]._forward_hooks
    with pytest.raises(ImagefitError, match=r"^module 'head' gives \[5, 10\], not feature "
                                            r"maps \(N, C, H, W\): choose a convolutional"):
        feature_maps(loaded, digit_images, "head")
    assert not loaded.model.head._forward_hooks


def test_timm_models_default_to_their_first_feature_block():
    model = create_model("resnet18", 3, 2, head="concat_pool").eval()
    assert default_feature_layer(model) == "body.act1"
    loaded = LoadedModel(model, Task("classification", ["a", "b"]), CacheSettings(32, 3),
                         BatchPipeline([0.5] * 3, [0.25] * 3), {})
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = loaded.pipeline(images).contiguous(memory_format=torch.channels_last)
    body = model.body
    with torch.no_grad():
        direct = body.layer1(body.maxpool(body.act1(body.bn1(body.conv1(x)))))
    torch.testing.assert_close(feature_maps(loaded, images, "body.layer1"), direct)
    assert direct.shape == (2, 64, 8, 8)


def test_grid_png_has_the_documented_size(tmp_path):
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    sizes = {}
    for channels in (3, 16, 64, 100):
        maps = torch.randn(channels, 6, 5)
        path = save_feature_map_grid(image, maps, "stages.0", tmp_path / f"{channels}.png")
        with Image.open(path) as picture:
            sizes[channels] = picture.size
            pixels = np.asarray(picture.convert("RGB")).astype(int)
        assert sizes[channels] == grid_size(channels)
        assert (np.abs(pixels - VIRIDIS_YELLOW).sum(axis=-1) < 30).any()  # the maps are drawn
    rows = {channels: 1 + -(-min(channels, MAX_CHANNELS) // COLUMNS) for channels in sizes}
    assert sizes == {c: (COLUMNS * CELL_PX[0], HEADER_PX + rows[c] * CELL_PX[1])
                     for c in sizes}
    assert sizes[3] == (960, 310) and sizes[16] == (960, 445) and sizes[64] == (960, 1255)
    assert sizes[100] == sizes[64]  # at most 64 channels are shown


def test_explain_command_writes_the_grid(digits_run, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(
        tmp_path / "digit.png")
    done = subprocess.run([sys.executable, "-m", "imagefit", "explain", str(digits_run),
                           str(tmp_path / "digit.png"), "--method", "feature-maps", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "out" / "digit_feature-maps.png") as picture:
        assert picture.size == grid_size(16)  # small_cnn_16's first stage: 16 channels


def test_unknown_layer_is_one_line_naming_some_modules(digits_run, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "digit.png")
    status = cli.main(["explain", str(digits_run), str(tmp_path / "digit.png"), "--method",
                       "feature-maps", "--layer", "layer9", "--out", str(tmp_path / "out")])
    assert status == 2
    assert capsys.readouterr().err == (
        "imagefit: error: model has no module 'layer9': choose a name from "
        "model.named_modules(), such as stages.0, stages.1, stages.2\n")
    assert not (tmp_path / "out" / "digit_feature-maps.png").exists()


def test_help_describes_the_method_and_the_layer(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "feature-maps: a grid of what one layer computes" in text
    assert "feature-maps: the module whose output is drawn (default: the first feature block" \
        in text


def test_report_shows_the_feature_maps_and_the_model_summary(digits_run):
    page = (digits_run / "report.html").read_text()
    heading = page.index("<h3>Feature maps</h3>")
    figure = page[heading:page.index("</figure>", heading)]
    assert '<img src="data:image/png;base64,' in figure
    assert ("<figcaption>Each channel of stages.0&#39;s output for the first validation "
            "image</figcaption>") in figure
    with Image.open(digits_run / "plots" / "feature_maps.png") as picture:
        assert picture.size == grid_size(16)
    config = page[page.index('<section id="config">'):page.index('<section id="dataset">')]
    summary = config[config.index('<pre class="summary">'):config.index("</pre>")]
    n_params = sum(p.numel() for p in load_model(digits_run, "cpu").model.parameters())
    assert f"Total params: {n_params:,}" in summary
    assert "├─" in summary and "[1, 16, 4, 4]" in summary  # the table, at 8 px


def test_report_command_redraws_them_and_says_how_to_get_torchinfo(digits_run, tmp_path,
                                                                    monkeypatch):
    run = tmp_path / digits_run.name  # a copy: the other tests read the fixture's files
    shutil.copytree(digits_run, run)
    (run / "plots" / "feature_maps.png").unlink()
    (run / "model_summary.txt").unlink()
    assert cli.main(["report", str(run)]) == 0
    assert (run / "plots" / "feature_maps.png").is_file()
    page = (run / "report.html").read_text()
    assert "<h3>Feature maps</h3>" in page and "Total params: " in page
    monkeypatch.setitem(sys.modules, "torchinfo", None)  # import torchinfo now fails
    assert save_model_summary(run) is None and not (run / "model_summary.txt").exists()
    page = write_report(run).read_text()
    assert '<pre class="summary">' not in page
    assert '<p class="note">install imagefit[zoo] for the model summary</p>' in page
