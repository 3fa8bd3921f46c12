"""The reference documents' own nets and heads: lenet_selu, --head linear and mlp,
--head-hidden, --act; each rebuilt from model.json as it was trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import imagefit
from imagefit import ImagefitError
from imagefit.evaluation.inference import load_model
from imagefit.evaluation.saliency import gradcam_layer
from imagefit.models import create_model
from imagefit.models.groups import layer_groups
from imagefit.models.heads import Residual


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


# -- lenet_selu --------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, side", [(1, 8), (3, 28)])
def test_lenet_selu_takes_any_channels_and_small_sizes(channels, side):
    model = create_model("lenet_selu", channels, 10).eval()
    assert model(torch.randn(4, channels, side, side)).shape == (4, 10)
    assert count(model, nn.SELU) == 3 and count(model, nn.AlphaDropout) == 1
    # its stages are the layer groups (then the head) and Grad-CAM's candidate maps
    assert len(layer_groups(model)) == 3
    assert gradcam_layer(model, side, channels) in {"stages.0", "stages.1"}


def test_lenet_selu_starts_lecun_normal():
    torch.manual_seed(0)
    conv = create_model("lenet_selu", 3, 10).stages[1][0]  # 32 channels x 5 x 5 = 800 inputs
    assert conv.weight.std().item() == pytest.approx(800 ** -0.5, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0


def test_lenet_selu_learns_digits_in_five_epochs(tmp_path):
    result = imagefit.fit("builtin:digits", model="lenet_selu", epochs=5, progress=False,
                          report=False, runs_dir=str(tmp_path))
    assert result.metrics["valid_accuracy"] >= 0.97  # builtin:digits has no test split
    # the small-image recipe without its SGD at 0.1, under which this net diverged
    config = (result.run_dir / "config.yaml").read_text()
    assert "opt: adamw" in config and "label_smoothing: 0.1" in config


# -- heads -------------------------------------------------------------------------------------


def test_mlp_head_is_linear_bn_relu_dropout_then_a_residual_block_then_linear():
    model = create_model("resnet18", 1, 3, head="mlp", head_hidden=16)
    x = torch.randn(4, 1, 32, 32)
    assert model(x).shape == (4, 3)
    first, residual, last = model.get_classifier()
    assert [type(m) for m in first] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert (first[0].in_features, first[0].out_features) == (512, 16)
    assert isinstance(residual, Residual)
    assert [type(m) for m in residual.block] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert isinstance(last, nn.Linear) and (last.in_features, last.out_features) == (16, 3)
    assert first[3].p == residual.block[3].p == 0.5  # --dropout's default for this head
    model.eval()
    hidden = torch.randn(4, 16)
    torch.testing.assert_close(residual(hidden), hidden + residual.block(hidden))
    # what get_classifier takes is forward_head's pre_logits (features precomputed for it)
    features = model.forward_features(x)
    torch.testing.assert_close(model.get_classifier()(model.forward_head(features, True)),
                               model(x))


def test_mlp_head_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = create_model("resnet18", 1, 3, head="mlp", head_hidden=16, dropout=0.3)
    x = torch.randn(8, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}


def test_linear_head_is_dropout_and_one_linear_layer():
    model = create_model("resnet18", 1, 3, head="linear", dropout=0.2).eval()
    x = torch.randn(4, 1, 32, 32)
    assert model(x).shape == (4, 3)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.in_features == 512
    assert [m.p for m in model.head.modules() if isinstance(m, nn.Dropout)] == [0.2]
    assert count(model.head, nn.Linear) == 1
    assert torch.count_nonzero(classifier.weight) == 0  # a new classifier starts at zero
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape == (4, 512)


def test_act_swaps_the_activation_of_a_timm_model_and_of_small_cnn():
    plain, silu = create_model("resnet18", 1, 2), create_model("resnet18", 1, 2, act="silu")
    assert count(plain, nn.ReLU) == 17 and count(plain, nn.SiLU) == 0
    assert count(silu, nn.SiLU) == 17 and count(silu, nn.ReLU) == 0
    small = create_model("small_cnn_16", 1, 2, act="mish")
    assert count(small, nn.Mish) == 6 and count(small, nn.GELU) == 0


def test_a_run_with_an_mlp_head_and_act_is_rebuilt_as_trained(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 50, (64, 32, 32), dtype=np.uint8)
    labels = np.arange(64) % 2
    images[labels == 1, 8:24, 8:24] = 220
    result = imagefit.fit(imagefit.from_arrays(images, labels), model="resnet18", head="mlp",
                          head_hidden=64, act="silu", epochs=1, bs=16, tta=False,
                          progress=False, report=False, runs_dir=str(tmp_path))
    info = json.loads((result.run_dir / "model.json").read_text())
    assert (info["head"], info["head_hidden"], info["dropout"], info["act"]) == (
        "mlp", 64, 0.5, "silu")
    loaded = load_model(result.run_dir, device="cpu")
    assert loaded.model.get_classifier()[-1].in_features == 64
    assert count(loaded.model.body, nn.SiLU) == 17 and count(loaded.model.body, nn.ReLU) == 0
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), result.model.cpu().eval()(x))


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"model": "ghostnet_050", "act": "silu"},
     "model ghostnet_050 does not take --act: leave it out, or choose a model that does "
     "(resnet18, efficientnet_b0, convnext_atto)"),
    ({"act": "swish"},
     "option --act: input should be 'relu', 'gelu', 'silu', 'mish' or 'selu' (got 'swish')"),
    ({"model": "small_cnn", "head": "mlp"},
     "model small_cnn has its own head: leave out --head"),
    ({"model": "lenet_selu", "act": "gelu"},
     "model lenet_selu has its own activation: leave out --act"),
    ({"model": "resnet18", "head_hidden": 64},
     "--head-hidden sizes the hidden layer of --head mlp or concat_pool: leave it out, or "
     "choose one of those heads"),
])
def test_options_a_model_cannot_take_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(ImagefitError) as error:
        imagefit.fit("builtin:digits", epochs=1, progress=False, runs_dir=str(tmp_path),
                     **options)
    assert str(error.value) == message
    assert not any(tmp_path.iterdir())  # refused before a run directory exists
