"""imagefit models and imagefit summary: names filtered, parameters and multiply-adds as
torchinfo counts them, a run's own model summarized at its own size."""

from __future__ import annotations

import builtins
import re
import subprocess
import sys

import pytest
import torchinfo

import imagefit
from imagefit import api
from imagefit.errors import ImagefitError
from imagefit.models import create_model


def test_names_are_filtered_by_word_or_wildcard():
    assert [row["model"] for row in api.list_models("small_cnn", costs=False)] == [
        "small_cnn", "small_cnn_16", "small_cnn_32", "small_cnn_64"]
    assert [row["model"] for row in api.list_models("regnety_00?", costs=False)] == [
        "regnety_002", "regnety_004", "regnety_006", "regnety_008"]
    assert api.list_models("no_such_net_anywhere", costs=False) == []


def test_resnet18_costs_are_the_published_ones():
    row, *others = api.list_models("resnet18", costs=True, limit=1)
    assert row["model"] == "resnet18"  # the name itself first, then names containing it
    assert others and all("resnet18" in o["model"] and "params" not in o for o in others)
    assert row["params"] == 11_689_512  # torchvision's and timm's ImageNet ResNet-18
    assert abs(row["macs"] / 1.82e9 - 1) < 0.01  # "1.8 GFLOPs" (multiply-adds), He et al.


@pytest.mark.parametrize("name, size, channels", [("small_cnn_16", 28, 1),
                                                  ("resnet18", 64, 3)])
def test_summary_is_torchinfos_table(name, size, channels):
    table = api.summary(name, size, channels, depth=2)
    direct = torchinfo.summary(create_model(name, channels, 1000).eval(),
                               input_size=(1, channels, size, size), depth=2,
                               col_names=("output_size", "num_params", "mult_adds"),
                               verbose=0, device="cpu")
    assert f"Total params: {direct.total_params:,}" in table
    assert "Output Shape" in table and "Mult-Adds" in table
    assert str(list(direct.summary_list[1].output_size)) in table  # first layer's shape


def first_convolution(table: str) -> tuple[str, int]:
    """The output shape and multiply-adds of the table's first Conv2d row."""
    row = next(line for line in table.splitlines() if "Conv2d" in line)
    shape, _, macs = re.search(r"(\[[\d, ]+\])\s+([\d,]+)\s+([\d,]+)\s*$", row).groups()
    return shape, int(macs.replace(",", ""))


def test_a_run_is_summarized_at_its_own_size_and_channels(tmp_path):
    result = imagefit.fit("builtin:digits", epochs=1, progress=False, report=False,
                          runs_dir=str(tmp_path))
    table = api.summary(result.run_dir)
    assert "[1, 10]" in table  # ten classes out

    def direct(size: int) -> str:
        return str(torchinfo.summary(result.model.eval().cpu(), input_size=(1, 1, size, size),
                                     depth=3, col_names=("output_size", "num_params",
                                                         "mult_adds"), verbose=0, device="cpu"))

    assert table == direct(8)  # at the run's 8 px and 1 channel
    # its first convolution, 1 -> 16 channels, 3x3, "same" padding: 16 * 9 * 8 * 8 MACs
    assert first_convolution(table) == ("[1, 16, 8, 8]", 16 * 9 * 8 * 8)
    larger = api.summary(result.run_dir, image_size=16)
    assert larger == direct(16) != table
    assert first_convolution(larger) == ("[1, 16, 16, 16]", 16 * 9 * 16 * 16)


def test_bad_names_and_missing_torchinfo_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ImagefitError, match="^unknown model 'resnet81': did you mean "):
        api.summary("resnet81")
    with pytest.raises(ImagefitError, match="holds no model.json: give a run directory"):
        api.summary(tmp_path)
    real_import = builtins.__import__

    def no_torchinfo(name, *args, **kwargs):
        if name == "torchinfo":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchinfo)
    with pytest.raises(ImagefitError) as error:
        api.summary("small_cnn_16", 16, 1)
    assert str(error.value) == ("model summaries need torchinfo: pip install 'imagefit[zoo]' "
                                "(or pip install torchinfo)")


def test_the_commands_print_the_table_and_the_list():
    done = subprocess.run([sys.executable, "-m", "imagefit", "summary", "regnety_002",
                           "--image-size", "224"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "RegNet" in done.stdout and "Total params: 3,162,996" in done.stdout
    listed = subprocess.run([sys.executable, "-m", "imagefit", "models", "regnetx_00?",
                             "--image-size", "224"], capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "params", "GMACs"]
    assert [line.split()[0] for line in lines[1:]] == [
        "regnetx_002", "regnetx_004", "regnetx_006", "regnetx_008"]


# Radosavovic et al. 2020, "Designing Network Design Spaces", appendix tables (also pycls's
# MODEL_ZOO.md): flops (billions of multiply-adds) and parameters (millions) at 224 px with
# ImageNet's 1,000 classes, each rounded to one decimal.
REGNET_PAPER = {
    "regnetx_002": (0.2, 2.7), "regnetx_004": (0.4, 5.2), "regnetx_006": (0.6, 6.2),
    "regnetx_008": (0.8, 7.3), "regnetx_016": (1.6, 9.2), "regnetx_032": (3.2, 15.3),
    "regnetx_040": (4.0, 22.1), "regnetx_064": (6.5, 26.2), "regnetx_080": (8.0, 39.6),
    "regnetx_120": (12.1, 46.1), "regnetx_160": (15.9, 54.3), "regnetx_320": (31.7, 107.8),
    "regnety_002": (0.2, 3.2), "regnety_004": (0.4, 4.3), "regnety_006": (0.6, 6.1),
    "regnety_008": (0.8, 6.3), "regnety_016": (1.6, 11.2), "regnety_032": (3.2, 19.4),
    "regnety_040": (4.0, 20.6), "regnety_064": (6.4, 30.6), "regnety_080": (8.0, 39.2),
    "regnety_120": (12.1, 51.8), "regnety_160": (15.9, 83.6), "regnety_320": (32.3, 145.0),
}


def test_all_24_regnets_have_the_papers_flops_and_parameters():
    listed = [row["model"] for row in api.list_models("regnet[xy]_[0-9][0-9][0-9]", costs=False)]
    assert set(REGNET_PAPER) <= set(listed)  # timm adds SEER's regnety_640 and others
    counted = {name: api.list_models(name, costs=True, limit=1)[0] for name in REGNET_PAPER}
    assert {name: (round(row["macs"] / 1e9, 1), round(row["params"] / 1e6, 1))
            for name, row in counted.items()} == REGNET_PAPER


def test_a_listing_goes_on_past_models_that_cannot_run_at_the_size_and_names_text_models():
    rows = {row["model"]: row for row in api.list_models("mobilenetv4_conv_aa_*", image_size=28)}
    assert rows["mobilenetv4_conv_aa_large"]["note"] == "cannot run on a 28 px image"
    assert rows["mobilenetv4_conv_aa_large"].get("params") is None
    assert api.list_models("mobilenetv4_conv_aa_large", image_size=224)[0]["params"] > 1e6
    (text,) = api.list_models("char_cnn")
    assert text["note"].startswith("text model (--task text)")
    with pytest.raises(ImagefitError, match=r"^char_cnn is a text model, whose size depends on "
                       r"the characters it was trained on: summarize a text fit's run "
                       r"directory instead \(imagefit summary RUN\)$"):
        api.summary("char_cnn")
