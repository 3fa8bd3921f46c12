"""Batch augmentation: property tests of the transforms, the policies, mixing and the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imagefit.augment import color, geometry
from imagefit.augment.mix import Mix
from imagefit.augment.pipeline import BatchPipeline
from imagefit.augment.policies import OPERATIONS, RandAugment
from imagefit.augment.presets import PRESETS, resolve_augment
from imagefit.config import AugmentOptions

PROPERTY = settings(max_examples=25, deadline=None)


@st.composite
def batches(draw):
    """Float batches in [0, 1] of 1-5 square grey or RGB images, 4-12 px."""
    n = draw(st.integers(1, 5))
    c = draw(st.sampled_from([1, 3]))
    h = w = draw(st.integers(4, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def texture(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A picture full of fine detail: random values at 2x2-pixel blocks."""
    blocks = torch.rand(1, 1, size // 2, size // 2, generator=gen(seed))
    return blocks.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(1, 3, size, size)


# -- properties every transform keeps ------------------------------------------------------

ALL_ON = AugmentOptions(flip=0.5, vflip=0.5, dihedral=0.5, shift=0.1, rotate=30,
                        zoom=(0.8, 1.3), translate=0.1, perspective=0.2, brightness=0.4,
                        contrast=0.4, saturation=0.4, hue=0.1, lighting=0.1, erase_p=0.5,
                        randaugment_n=2)


@PROPERTY
@given(x=batches(), seed=st.integers(0, 1000))
def test_pipeline_keeps_shape_dtype_and_range(x, seed):
    lighting = {"eigenvalues": [0.01, 0.02, 0.2], "eigenvectors": np.eye(3).tolist()}
    pipeline = BatchPipeline([0.0] * x.shape[1], [1.0] * x.shape[1], ALL_ON, lighting=lighting)
    out = pipeline.augment_batch(x.clone(), gen(seed))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@PROPERTY
@given(x=batches(), seed=st.integers(0, 1000), size=st.integers(3, 16))
def test_resampling_gives_the_requested_size(x, seed, size):
    pipeline = BatchPipeline([0.0] * x.shape[1], [1.0] * x.shape[1],
                             AugmentOptions(rotate=20, crop_area=(0.3, 1.0)))
    out = pipeline.augment_batch(x, gen(seed), size=size)
    assert out.shape == (len(x), x.shape[1], size, size)


@PROPERTY
@given(x=batches(), seed=st.integers(0, 1000))
def test_probability_zero_is_identity(x, seed):
    g = gen(seed)
    assert torch.equal(geometry.flip_horizontal(x, g, p=0.0), x)
    assert torch.equal(geometry.flip_vertical(x, g, p=0.0), x)
    assert torch.equal(geometry.dihedral(x, g, p=0.0), x)
    assert torch.equal(color.random_erase(x, g, p=0.0), x)
    matrices = torch.cat([geometry.random_rotation(g, 3, 45, 0.0),
                          geometry.random_zoom(g, 3, 0.5, 2.0, 0.0),
                          geometry.random_translation(g, 3, 0.3, 0.0),
                          geometry.random_perspective(g, 3, 0.3, 0.0)])
    assert torch.allclose(matrices, torch.eye(3).expand_as(matrices))


@PROPERTY
@given(x=batches(), seed=st.integers(0, 1000))
def test_magnitude_zero_is_identity(x, seed):
    g = gen(seed)
    torch.testing.assert_close(
        color.color_jitter(x, g, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0), x)
    matrices = torch.cat([geometry.random_rotation(g, 3, 0.0, 1.0),
                          geometry.random_zoom(g, 3, 1.0, 1.0, 1.0),
                          geometry.random_translation(g, 3, 0.0, 1.0),
                          geometry.random_perspective(g, 3, 0.0, 1.0)])
    torch.testing.assert_close(matrices, torch.eye(3).expand_as(matrices))
    torch.testing.assert_close(geometry.warp(x, geometry.identity(len(x), x.device)), x)
    zero = torch.zeros(len(x))
    for operation in OPERATIONS:
        if operation.name in ("flip", "autocontrast", "equalize"):
            continue  # no magnitude: these always act
        if operation.matrix is not None:
            torch.testing.assert_close(operation.matrix(zero), geometry.identity(len(x), "cpu"))
        else:
            torch.testing.assert_close(operation.pixels(x.clone(), zero, g), x,
                                       msg=operation.name)


@PROPERTY
@given(x=batches(), seed=st.integers(0, 1000))
def test_flipping_twice_is_identity(x, seed):
    once = geometry.flip_horizontal(x, gen(seed), p=1.0)
    assert torch.equal(once, x.flip(3))
    assert torch.equal(geometry.flip_horizontal(once, gen(seed), p=1.0), x)
    assert torch.equal(geometry.flip_vertical(geometry.flip_vertical(x, gen(seed), 1.0),
                                              gen(seed), 1.0), x)


def test_dihedral_yields_the_8_distinct_symmetries():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    out = geometry.dihedral(image.expand(400, 1, 4, 4), gen(0), p=1.0)
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 8
    expected = set()
    for k in range(4):
        rotated = torch.rot90(image, k, dims=(2, 3))
        expected |= {tuple(rotated.flatten().tolist()),
                     tuple(rotated.flip(3).flatten().tolist())}
    assert distinct == expected


@PROPERTY
@given(x=batches(), seed=st.integers(0, 1000))
def test_same_seed_gives_the_same_batch(x, seed):
    pipeline = BatchPipeline([0.5] * x.shape[1], [0.2] * x.shape[1], ALL_ON, n_classes=3)
    uint8 = (x * 255).to(torch.uint8)
    y = torch.arange(len(x)) % 3
    a = pipeline.train_batch(uint8, y, gen(seed))
    b = pipeline.train_batch(uint8, y, gen(seed))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@PROPERTY
@given(x=batches(), seed=st.integers(0, 1000), preset=st.sampled_from(sorted(PRESETS)))
def test_label_preserving_presets_leave_targets_unchanged(x, seed, preset):
    options = resolve_augment(preset)
    pipeline = BatchPipeline([0.5] * x.shape[1], [0.2] * x.shape[1], options, n_classes=4)
    y = torch.arange(len(x)) % 4
    _, targets = pipeline.train_batch((x * 255).to(torch.uint8), y, gen(seed), mix=False)
    assert torch.equal(targets, y)


@PROPERTY
@given(x=batches(), seed=st.integers(0, 1000), mixup=st.sampled_from([0.0, 0.4]),
       cutmix=st.sampled_from([0.0, 1.0]))
def test_mixed_single_label_targets_sum_to_one(x, seed, mixup, cutmix):
    if not (mixup or cutmix):
        mixup = 0.2
    y = torch.nn.functional.one_hot(torch.arange(len(x)) % 3, 3).float()
    mixed_x, mixed_y = Mix(mixup, cutmix)(x, y, gen(seed))
    assert mixed_x.shape == x.shape
    torch.testing.assert_close(mixed_y.sum(dim=1), torch.ones(len(x)))
    assert (mixed_y >= 0).all()


def test_cutmix_target_weight_is_the_pasted_area():
    x = torch.zeros(64, 1, 20, 20)
    x[::2] = 1.0  # even rows white, odd rows black; partners mix them
    y = torch.stack([x[:, 0, 0, 0], 1 - x[:, 0, 0, 0]], dim=1)
    mixed_x, mixed_y = Mix(cutmix=1.0)(x, y, gen(3))
    white_fraction = mixed_x.mean(dim=(1, 2, 3))
    torch.testing.assert_close(mixed_y[:, 0], white_fraction)


def test_mixup_mixes_regression_and_multilabel_targets_linearly():
    """Image i is the constant i/8; its targets are i (a regression value) and 1 - i/7 (a
    soft label): whatever partner and lambda an image gets, each mixed target is the same
    affine function of the blend its pixels show."""
    n = 8
    x = (torch.arange(n, dtype=torch.float32) / n)[:, None, None, None].expand(n, 1, 6, 6)
    index = torch.arange(n, dtype=torch.float32)
    values = torch.stack([index, 1 - index / (n - 1)], dim=1)
    mixed_x, mixed_y = Mix(mixup=0.4)(x.clone(), values, gen(1))
    assert torch.equal(mixed_x, mixed_x[:, :, :1, :1].expand_as(mixed_x))  # one lambda each
    blend = mixed_x[:, 0, 0, 0] * n  # lam * i + (1 - lam) * partner
    torch.testing.assert_close(mixed_y[:, 0], blend, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed_y[:, 1], 1 - blend / (n - 1), rtol=1e-5, atol=1e-5)
    assert (blend - index).abs().gt(0.05).sum() >= n // 2  # partners were mixed in


def test_one_composed_resampling_is_sharper_than_two():
    x = texture()
    rotation = geometry.rotation_matrix(torch.tensor([0.3]))
    zoom = geometry.scale_matrix(torch.tensor([1 / 1.2]), torch.tensor([1 / 1.2]))
    once = geometry.warp(x, rotation @ zoom)
    twice = geometry.warp(geometry.warp(x, rotation), zoom)

    def sharpness(image):  # mean absolute difference between neighbouring pixels
        return (image[..., 1:, :] - image[..., :-1, :]).abs().mean().item()

    assert sharpness(once) > 1.15 * sharpness(twice)


def test_rotation_by_90_degrees_matches_rot90():
    x = torch.rand(2, 3, 8, 8, generator=gen(0))
    out = geometry.warp(x, geometry.rotation_matrix(torch.full((2,), torch.pi / 2)))
    assert any(torch.allclose(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))


def test_shift_moves_by_whole_pixels():
    x = torch.rand(16, 1, 10, 10, generator=gen(0))
    out = geometry.shift(x, gen(1), pad=2)
    for original, moved in zip(x, out):
        assert any(torch.equal(moved[:, 2:-2, 2:-2], original[:, 2 + dy:8 + dy, 2 + dx:8 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_one_channel_images_stay_correct_under_colour():
    x = torch.rand(4, 1, 8, 8, generator=gen(0))
    torch.testing.assert_close(color.adjust_saturation(x, torch.full((4,), 0.0)), x)
    torch.testing.assert_close(color.adjust_hue(x, torch.full((4,), 0.3)), x)
    out = color.color_jitter(x, gen(1), brightness=0.3, contrast=0.3, saturation=0.5, hue=0.2)
    assert out.shape == x.shape


def test_hue_shift_keeps_grey_pixels_grey_and_a_full_turn_is_identity():
    grey = torch.full((2, 3, 4, 4), 0.4)
    torch.testing.assert_close(color.adjust_hue(grey, torch.tensor([0.25, 0.5])), grey)
    x = torch.rand(2, 3, 4, 4, generator=gen(0))
    torch.testing.assert_close(color.adjust_hue(x, torch.ones(2)), x, atol=1e-5, rtol=1e-5)


def test_pca_statistics_find_the_main_colour_direction():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 255, (50, 8, 8, 1))
    images = np.concatenate([t, t, t], axis=-1).astype(np.uint8)  # varies along (1,1,1)
    stats = color.pca_statistics(images)
    main = np.array(stats["eigenvectors"])[:, int(np.argmax(stats["eigenvalues"]))]
    assert abs(abs(main @ np.ones(3) / np.sqrt(3)) - 1) < 1e-3


def test_randaugment_gives_each_image_its_own_operations():
    policy = RandAugment(n=2, magnitude=9)
    plan = policy.sample(64, gen(0))
    chosen = torch.stack([r[0] for r in plan.rounds])
    assert len(set(chosen[0].tolist())) > 5
    trivial = RandAugment(trivial=True, magnitude=10).sample(64, gen(0))
    assert len(trivial.rounds) == 1
    assert trivial.rounds[0][1].abs().unique().numel() > 10  # magnitude drawn per image


def test_randaugment_skip_one_round_of_identity():
    policy = RandAugment(n=2, magnitude=9, skip=0.999)
    plan = policy.sample(32, gen(0))
    assert all((r[0] == 0).float().mean() > 0.9 for r in plan.rounds)


def test_progressive_sizes_and_mix_off():
    from imagefit.train.callbacks import MixOff, ProgressiveResize

    resize = ProgressiveResize([64, 128, 224])
    assert [resize.size_at(e, 6) for e in range(6)] == [64, 64, 128, 128, 224, 224]

    class Learner:
        n_epochs, epoch, mixing = 5, 0, True

    learner, off = Learner(), MixOff(2)
    states = []
    for learner.epoch in range(5):
        off.before_epoch(learner)
        states.append(learner.mixing)
    assert states == [True, True, True, False, False]


def test_preset_overrides_apply_over_the_preset():
    options = resolve_augment("side_on", AugmentOptions(rotate=25))
    assert options.rotate == 25 and options.flip == 0.5 and options.zoom == (1.0, 1.1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_on_grey_and_rgb(preset):
    for channels in (1, 3):
        pipeline = BatchPipeline([0.5] * channels, [0.2] * channels, resolve_augment(preset),
                                 lighting={"eigenvalues": [0.0, 0.0, 0.1],
                                           "eigenvectors": np.eye(3).tolist()},
                                 n_classes=3)
        x = torch.randint(0, 256, (6, channels, 16, 16), dtype=torch.uint8)
        out, y = pipeline.train_batch(x, torch.arange(6) % 3, gen(0))
        assert out.shape == (6, channels, 16, 16) and torch.isfinite(out).all()


def test_affine_and_perspective_paths_agree_on_an_affine_matrix():
    x = torch.rand(3, 3, 10, 10, generator=gen(0))
    matrices = geometry.random_rotation(gen(1), 3, 30, 1.0) @ geometry.random_zoom(
        gen(2), 3, 0.8, 1.2, 1.0)
    nudged = matrices.clone()
    nudged[:, 2, 0] = 1e-12  # forces the homography path, same map
    torch.testing.assert_close(geometry.warp(x, matrices), geometry.warp(x, nudged),
                               atol=1e-5, rtol=1e-5)


def test_fused_colour_jitter_equals_the_operations_in_sequence():
    x = torch.rand(6, 3, 8, 8, generator=gen(0)) * 0.4 + 0.3  # no clipping on the way
    amounts = dict(brightness=0.2, contrast=0.2, saturation=0.3, hue=0.05)
    fused = color.color_jitter(x, gen(5), **amounts)
    g = gen(5)
    fb, fc, fs = (color._factors(g, 6, amounts[k], 1.0) for k in
                  ("brightness", "contrast", "saturation"))
    turns = color._factors(g, 6, amounts["hue"], 1.0) - 1
    expected = color.adjust_hue(color.adjust_saturation(color.adjust_contrast(
        color.adjust_brightness(x, fb), fc), fs), turns)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_matrix_flips_match_the_gather_flips():
    x = torch.rand(2, 1, 6, 6, generator=gen(0))
    mirror = geometry.scale_matrix(torch.full((2,), -1.0), torch.ones(2))
    torch.testing.assert_close(geometry.warp(x, mirror), x.flip(3), atol=1e-6, rtol=1e-6)
    transposed = geometry.random_dihedral(gen(0), 400, 1.0)
    assert len({tuple(m.flatten().tolist()) for m in transposed}) == 8
