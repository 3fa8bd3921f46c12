"""Saliency maps: their shape and range, the files ``explain`` writes, the model left as it
was, clear errors, and Grad-CAM landing on the object that decides the class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import imagefit
from imagefit import ImagefitError
from imagefit.augment.pipeline import BatchPipeline
from imagefit.data.cache import CacheSettings
from imagefit.explain import (
    explain,
    explain_images,
    gradcam_layer,
    model_outputs,
    saliency_maps,
)
from imagefit.inference import LoadedModel, load_model
from imagefit.models import create_model
from imagefit.tasks import Task

SIZE = 28


def shapes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark noisy images with one bright 9x9 square (class 0) or disc of the same area
    (class 1) at a random place: only the object tells the classes apart."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 20, (count, SIZE, SIZE), dtype=np.uint8)
    labels = np.arange(count) % 2
    rows, columns = np.mgrid[:SIZE, :SIZE]
    for image, label in zip(images, labels):
        y, x = rng.integers(6, SIZE - 6, 2)
        if label == 0:
            inside = (abs(rows - y) <= 4) & (abs(columns - x) <= 4)
        else:
            inside = (rows - y) ** 2 + (columns - x) ** 2 <= 25
        image[inside] = rng.integers(200, 256)
    return images, labels


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A small CNN that tells squares from discs, trained once for the tests below."""
    root = tmp_path_factory.mktemp("explain")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMAGEFIT_CACHE", str(root / "cache"))
        patch.setenv("IMAGEFIT_OFFLINE", "1")
        images, labels = shapes(400, seed=0)
        table = imagefit.from_arrays(images, labels, names=["square", "disc"])
        # fp32 wherever the suite runs: a bf16 fit (CPUs with AMX) learns another model,
        # whose Grad-CAM of squares points at their absence around the disc test
        result = imagefit.fit(table, epochs=3, runs_dir=str(root / "runs"), progress=False,
                              precision="fp32")
    assert result.metrics["valid_accuracy"] >= 0.95
    return result.run_dir


@pytest.fixture
def test_images() -> torch.Tensor:
    images, _ = shapes(16, seed=1)
    return torch.from_numpy(images)[:, None]


def write_pngs(folder, images: torch.Tensor) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"shape_{i}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image[0].numpy()).save(path)
    return paths


@pytest.mark.parametrize("method", ["gradcam", "guided-backprop"])
def test_maps_have_the_images_shape_and_lie_in_unit_range(shapes_run, test_images, method):
    maps = saliency_maps(load_model(shapes_run, "cpu"), test_images, method)
    assert maps.shape == (16, SIZE, SIZE) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(16))


def test_gradcam_puts_its_mass_on_the_deciding_object(shapes_run, test_images):
    loaded = load_model(shapes_run, "cpu")
    objects = (test_images[:, 0] > 100).float()
    for method in ("gradcam", "guided-backprop"):
        maps = saliency_maps(loaded, test_images, method)
        mass_on_object = (maps * objects).sum(dim=(1, 2)) / maps.sum(dim=(1, 2))
        # the object covers about a tenth of the image; a blind map puts a tenth there
        ratio = mass_on_object / objects.mean(dim=(1, 2))
        if method == "gradcam":  # measured with the default small_cnn_16: 3.2 and 3.8
            assert ratio.min() > 1.5 and ratio.median() > 2.5
        else:  # the plain input gradient of the GELU net is more diffuse: 0.7 and 2.3
            assert ratio.median() > 1.8 and ratio.mean() > 1.8


@pytest.mark.parametrize("method", ["gradcam", "guided-backprop"])
def test_explain_writes_one_png_per_image(shapes_run, test_images, tmp_path, method):
    write_pngs(tmp_path / "a", test_images[:3])
    write_pngs(tmp_path / "b", test_images[3:5])  # shape_0, shape_1 again: names must differ
    written = explain(shapes_run, [tmp_path / "a", tmp_path / "b" / "shape_0.png"],
                      tmp_path / "out", method=method, progress=False)
    assert len(written) == 4 == len(set(written))
    assert sorted(p.name for p in written) == sorted(
        [f"shape_{i}_{method}.png" for i in range(3)] + [f"shape_0-2_{method}.png"])
    for path in written:
        assert path.parent == tmp_path / "out"
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width > picture.height


def test_explain_images_draws_one_grid(shapes_run, test_images, tmp_path):
    path = explain_images(load_model(shapes_run, "cpu"), test_images[:4], None, "gradcam",
                          tmp_path / "grid.png")
    assert list(tmp_path.iterdir()) == [path]
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    assert pixels.std() > 20  # drawn
    warm = (pixels[..., 0] - pixels[..., 2] > 60).mean()  # the heat map's reds over the images
    assert 0.005 < warm < 0.5


def test_model_is_left_as_it_was(shapes_run, test_images):
    loaded = load_model(shapes_run, "cpu")
    model = loaded.model
    model.train()
    model.stages[0].eval()  # a mixed state must come back as it was, too
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    for method in ("gradcam", "guided-backprop"):
        saliency_maps(loaded, test_images, method)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks
                    or module._backward_hooks or module._backward_pre_hooks)
    model.eval()
    assert torch.equal(model_outputs(loaded, test_images).argmax(dim=1),
                       model_outputs(load_model(shapes_run, "cpu"), test_images).argmax(dim=1))


def test_target_class_is_explained_instead_of_the_prediction(shapes_run, test_images):
    loaded = load_model(shapes_run, "cpu")
    predicted = model_outputs(loaded, test_images).argmax(dim=1)
    other = saliency_maps(loaded, test_images, "gradcam", 1 - predicted)
    own = saliency_maps(loaded, test_images, "gradcam")
    assert not torch.allclose(own, other)


def test_unknown_target_class_names_it_and_the_known_ones(shapes_run, test_images, tmp_path):
    write_pngs(tmp_path / "in", test_images[:1])
    with pytest.raises(ImagefitError, match=r"unknown target class 'triangle'.*square, disc"):
        explain(shapes_run, [tmp_path / "in"], tmp_path / "out", target="triangle",
                progress=False)
    assert len(explain(shapes_run, [tmp_path / "in"], tmp_path / "out", target="disc",
                       progress=False)) == 1


def test_missing_image_path_is_an_input_error(shapes_run, tmp_path):
    with pytest.raises(ImagefitError, match=r"input .*nowhere\.png not found"):
        explain(shapes_run, [tmp_path / "nowhere.png"], tmp_path / "out", progress=False)


def test_bad_method_names_the_option(shapes_run, tmp_path):
    with pytest.raises(ImagefitError, match=r"option --method"):
        explain(shapes_run, [tmp_path], tmp_path / "out", method="lime")


@pytest.mark.parametrize("name, head, layer", [
    ("small_cnn", "timm", "stages.0"),
    ("small_cnn_16", "timm", "stages.1"),
    ("resnet18", "timm", "layer4"),
    ("resnet18", "concat_pool", "body.layer4"),
    ("tf_efficientnet_lite0", "timm", "blocks.6"),
    ("convnext_atto", "timm", "stages.3"),
])
def test_gradcam_layer_is_the_last_feature_block_unless_too_coarse(name, head, layer):
    size = 28 if name.startswith("small_cnn") else 224
    model = create_model(name, 1, 2, head=head).eval()
    assert gradcam_layer(model, size, 1) == layer


def test_gradcam_without_a_feature_map_says_what_to_do():
    model = create_model("vit_tiny_patch16_224", 1, 2).eval()
    with pytest.raises(ImagefitError, match=r"--layer.*guided-backprop"):
        gradcam_layer(model, 224, 1)


def test_relu_model_with_a_concat_pool_head_is_explained_and_unhooked():
    model = create_model("resnet18", 3, 2, head="concat_pool").eval()
    loaded = LoadedModel(model, Task("classification", ["a", "b"]), CacheSettings(64, 3),
                         BatchPipeline([0.5] * 3, [0.25] * 3), {})
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    for method in ("gradcam", "guided-backprop"):
        assert saliency_maps(loaded, images, method).shape == (2, 64, 64)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
