"""Saliency maps: their shape and range, the files ``explain`` writes, the model left as it
was, clear errors, and Grad-CAM landing on the object that decides the class."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import Saliency
from PIL import Image
from timm.layers.activations_me import SwishMe
from torch import nn

import imagefit
from conftest import isolated
from imagefit import ImagefitError
from imagefit.augment.pipeline import BatchPipeline
from imagefit.data.cache import CacheSettings
from imagefit.evaluation.guided import GuidedBackprop, guided_activations
from imagefit.evaluation.inference import LoadedModel, load_model
from imagefit.evaluation.saliency import gradcam_layer, loaded_outputs, saliency_maps
from imagefit.models import create_model
from imagefit.report.overlays import explain_images
from imagefit.tasks import Task
from imagefit.workflows.explain import explain

SIZE = 28


def shapes(count: int, seed: int, kinds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Dark noisy images with one bright 9x9 square (class 0) or disc of the same area
    (class 1) at a random place: only the object tells the classes apart. ``kinds=3`` adds
    class 2, the noise alone."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 20, (count, SIZE, SIZE), dtype=np.uint8)
    labels = np.arange(count) % kinds
    rows, columns = np.mgrid[:SIZE, :SIZE]
    for image, label in zip(images, labels):
        y, x = rng.integers(6, SIZE - 6, 2)
        if label == 0:
            inside = (abs(rows - y) <= 4) & (abs(columns - x) <= 4)
        elif label == 1:
            inside = (rows - y) ** 2 + (columns - x) ** 2 <= 25
        else:
            continue
        image[inside] = rng.integers(200, 256)
    return images, labels


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A small CNN that tells squares from discs, trained once for the tests below."""
    root = tmp_path_factory.mktemp("explain")
    with isolated(root):
        images, labels = shapes(400, seed=0)
        table = imagefit.from_arrays(images, labels, names=["square", "disc"])
        # fp32 wherever the suite runs: the tests of this model are of files, modes and
        # targets; where the maps fall is objects_run's, in both precisions
        result = imagefit.fit(table, epochs=3, runs_dir=str(root / "runs"), progress=False,
                              precision="fp32")
    assert result.metrics["valid_accuracy"] >= 0.95
    return result.run_dir


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def objects_run(request, tmp_path_factory):
    """Squares, discs and images with neither, trained in each precision (bf16 autocast runs
    on any CPU, emulated without AMX), so that every machine checks both. With two classes,
    one of them can be told by the other's absence: which one a fit learns that way depended
    on the CPU's arithmetic (fp32 on an AVX2 CPU: Grad-CAM of squares on the background,
    mass ratio 0.42-0.76, where an AMX Xeon gave 3.2), and a map of absent evidence has no
    object to sit on. Where no object is a class of its own, each object is evidence for its
    class."""
    root = tmp_path_factory.mktemp("objects")
    with isolated(root):
        images, labels = shapes(600, seed=0, kinds=3)
        table = imagefit.from_arrays(images, labels, names=["square", "disc", "none"])
        result = imagefit.fit(table, epochs=5, runs_dir=str(root / "runs"), progress=False,
                              report=False, precision=request.param)
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


def test_gradcam_puts_its_mass_on_the_deciding_object(objects_run):
    loaded = load_model(objects_run, "cpu")
    images, labels = shapes(24, seed=1, kinds=3)
    images = torch.from_numpy(images[labels < 2])[:, None]  # the 16 with an object
    objects = (images[:, 0] > 100).float()
    for method in ("gradcam", "guided-backprop"):
        maps = saliency_maps(loaded, images, method)
        mass_on_object = (maps * objects).sum(dim=(1, 2)) / maps.sum(dim=(1, 2))
        # the object covers about a tenth of the image; a blind map puts a tenth there
        ratio = mass_on_object / objects.mean(dim=(1, 2))
        # measured over seeds 0-4 in fp32 and in bf16 on an AVX2 CPU (10 fits): Grad-CAM
        # (small_cnn_16's default layer, stages.1) min 2.60-3.98, median 3.10-4.29; guided
        # backprop's positive part min 4.02-7.51, median 5.49-8.29
        if method == "gradcam":
            assert ratio.min() > 1.5 and ratio.median() > 2.5
        else:  # the plain gradient: 0.7 and 2.3
            assert ratio.min() > 3 and ratio.median() > 5


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
    assert torch.equal(loaded_outputs(loaded, test_images).argmax(dim=1),
                       loaded_outputs(load_model(shapes_run, "cpu"), test_images).argmax(dim=1))


def test_target_class_is_explained_instead_of_the_prediction(shapes_run, test_images):
    loaded = load_model(shapes_run, "cpu")
    predicted = loaded_outputs(loaded, test_images).argmax(dim=1)
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


# guided backprop's rule on every activation module (imagefit.evaluation.guided)

def guided_net(act: nn.Module) -> nn.Sequential:
    """conv -> act -> conv -> max-pool -> linear, with seeded weights: the gradient reaching
    the activation's output has both signs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), act, nn.Conv2d(6, 6, 3, padding=1),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def record_activation(module: nn.Module, seen: dict) -> list:
    """Hooks that keep the activation's input ``x``, the gradient reaching its output
    (``grad_out``) and the gradient it passes back to its input (``grad_in``), per call."""
    def before(module, inputs):
        inputs[0].register_hook(lambda grad: seen.setdefault("grad_in", []).append(grad))
        seen.setdefault("x", []).append(inputs[0].detach().clone())

    def after(module, inputs, output):
        output.register_hook(lambda grad: seen.setdefault("grad_out", []).append(grad))
    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


GUIDED_ACTIVATIONS = [
    lambda: nn.ReLU(inplace=True), lambda: nn.ReLU6(inplace=True),
    lambda: nn.LeakyReLU(0.1, inplace=True), nn.PReLU, lambda: nn.ELU(inplace=True),
    nn.CELU, lambda: nn.SELU(inplace=True), nn.GELU, lambda: nn.GELU(approximate="tanh"),
    lambda: nn.SiLU(inplace=True), lambda: nn.Mish(inplace=True),
    lambda: nn.Hardswish(inplace=True), timm.layers.GELU, timm.layers.QuickGELU,
    lambda: timm.layers.Swish(inplace=True), lambda: timm.layers.HardSwish(inplace=True),
    timm.layers.HardMish, SwishMe,
]


@pytest.mark.parametrize("make_act", GUIDED_ACTIVATIONS)
def test_every_activation_type_passes_back_the_guided_gradient_and_is_released(make_act):
    act = make_act()
    model = guided_net(act)
    inplace = getattr(act, "inplace", None)
    x = torch.randn(4, 3, 12, 12, requires_grad=True)
    seen: dict = {}
    with guided_activations(model) as hooked:
        assert hooked == [act] and len(act._forward_hooks) == 1
        assert getattr(act, "inplace", False) is False  # it would overwrite the rule's x
        handles = record_activation(act, seen)
        model(x)[:, 1].sum().backward()
        for handle in handles:
            handle.remove()
    assert not (act._forward_hooks or act._forward_pre_hooks or act._backward_hooks)
    assert getattr(act, "inplace", None) == inplace
    (before,), (grad_out,), (grad_in,) = seen["x"], seen["grad_out"], seen["grad_in"]
    # the activation's own slope f'(x), from a fresh copy of it on the same input
    probe = before.clone().requires_grad_()
    fresh = make_act()
    if hasattr(fresh, "inplace"):
        fresh.inplace = False
    fresh.load_state_dict(act.state_dict())
    (slope,) = torch.autograd.grad(fresh(probe).sum(), probe)
    assert ((before > 0) & (grad_out < 0)).any() and ((before > 0) & (grad_out > 0)).any()
    expected = slope * grad_out.clamp_min(0) * (before > 0)
    assert torch.allclose(grad_in, expected, atol=1e-6)
    assert (grad_in >= 0).all() and (grad_in[before <= 0] == 0).all()
    assert not torch.allclose(grad_in, slope * grad_out)  # the plain backward pass


class SharedGelu(nn.Module):
    """One GELU module called twice (torchvision's ResNet blocks reuse their ReLU so)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.first, self.second = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act, self.head = nn.GELU(), nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.second(self.act(self.first(x))))
        return self.head(x.amax(dim=(2, 3)))


def test_a_module_called_twice_gets_the_rule_at_each_call():
    model = SharedGelu().eval()
    seen: dict = {}
    with guided_activations(model):
        handles = record_activation(model.act, seen)
        model(torch.randn(3, 1, 10, 10, requires_grad=True))[:, 0].sum().backward()
        for handle in handles:
            handle.remove()
    assert len(seen["x"]) == len(seen["grad_in"]) == 2
    # backward meets the calls in reverse order
    for before, grad_in in zip(seen["x"], reversed(seen["grad_in"])):
        assert (grad_in >= 0).all() and (grad_in[before <= 0] == 0).all()
        assert (grad_in[before > 0] > 0).any()


def test_guided_backprop_of_the_small_cnn_is_not_its_plain_gradient():
    model = create_model("small_cnn_16", 1, 3).eval()
    for module in model.modules():  # random BN statistics, as after some training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
    images, _ = shapes(4, seed=2)
    x = (torch.from_numpy(images)[:, None].float() - 30) / 60
    targets = torch.tensor([0, 1, 2, 0])
    guided = GuidedBackprop(model).attribute(x.clone().requires_grad_(), target=targets)
    plain = Saliency(model).attribute(x.clone().requires_grad_(), target=targets, abs=False)
    assert guided.shape == plain.shape and guided.abs().amax() > 0
    correlation = torch.corrcoef(torch.stack([guided.flatten(), plain.flatten()]))[0, 1]
    assert correlation < 0.9
    # the gradient the first GELU passes back is non-negative, zero where its input is not
    # positive; the plain one has both signs where the input is positive
    first_act = model.stages[0][3]
    for rule in ("guided", "plain"):
        seen: dict = {}
        handles = record_activation(first_act, seen)
        try:
            if rule == "guided":
                with guided_activations(model):
                    model(x.clone().requires_grad_())[:, 1].sum().backward()
            else:
                model(x.clone().requires_grad_())[:, 1].sum().backward()
        finally:
            for handle in handles:
                handle.remove()
        (before,), (grad_in,) = seen["x"], seen["grad_in"]
        on = before > 0
        if rule == "guided":
            assert (grad_in >= 0).all() and (grad_in[~on] == 0).all() and grad_in.amax() > 0
        else:
            assert (grad_in[on] < 0).any() and (grad_in[on] > 0).any()
    model.zero_grad(set_to_none=True)


def test_guided_backprop_maps_of_a_gelu_model_differ_from_the_plain_gradients():
    model = create_model("small_cnn_16", 1, 2).eval()
    loaded = LoadedModel(model, Task("classification", ["a", "b"]), CacheSettings(SIZE, 1),
                         BatchPipeline([0.1], [0.3]), {})
    images = torch.from_numpy(shapes(6, seed=3)[0])[:, None]
    maps = saliency_maps(loaded, images, "guided-backprop", torch.tensor([0, 1] * 3))
    x = loaded.pipeline(images).requires_grad_()
    plain = Saliency(model).attribute(x, target=torch.tensor([0, 1] * 3), abs=False).detach()
    for plain_map in (plain.abs().sum(dim=1), plain.amax(dim=1).clamp_min(0)):
        low = plain_map.amin(dim=(1, 2), keepdim=True)
        plain_map = (plain_map - low) / (plain_map.amax(dim=(1, 2), keepdim=True) - low)
        assert (maps - plain_map).abs().amax(dim=(1, 2)).min() > 0.2
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_relu_models_get_captums_guided_backprop():
    model = create_model("resnet18", 3, 2, head="concat_pool").eval()
    x = torch.randn(2, 3, 32, 32)
    targets = torch.tensor([0, 1])
    ours = GuidedBackprop(model).attribute(x.clone().requires_grad_(), target=targets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks")
        captums = CaptumGuidedBackprop(model).attribute(x.clone().requires_grad_(),
                                                        target=targets)
    plain = Saliency(model).attribute(x.clone().requires_grad_(), target=targets, abs=False)
    assert torch.allclose(ours, captums, rtol=1e-4, atol=1e-7) and ours.abs().amax() > 0
    assert not torch.allclose(ours, plain, rtol=1e-2, atol=1e-5)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


class FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.nn.functional.relu(self.conv(x)).amax(dim=(2, 3)))


def test_guided_backprop_refuses_a_model_without_activation_modules():
    with pytest.raises(ImagefitError, match="no activation module.*gradcam"):
        GuidedBackprop(FunctionalRelu()).attribute(torch.randn(1, 1, 8, 8), target=0)
