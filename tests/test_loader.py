"""The batch loader, normalization statistics, the batch pipeline and the geometric
augmentations."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imagefit import distributed
from imagefit.augment.geometry import flip_horizontal, shift
from imagefit.augment.pipeline import BatchPipeline
from imagefit.augment.presets import PRESETS, resolve_augment
from imagefit.config import AugmentOptions
from imagefit.data.loader import Loader
from imagefit.data.prepare import channel_stats


def indexed_images(n: int, size: int = 4, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, C) images whose every pixel holds the row index, and targets = index."""
    assert n <= 256
    values = torch.arange(n, dtype=torch.uint8)
    images = values[:, None, None, None].expand(n, size, size, channels).contiguous()
    return images, torch.arange(n, dtype=torch.int64)


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "imagefit-loader" and t.is_alive()]


def wait_for_no_loader_threads(timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not loader_threads():
            return True
        time.sleep(0.01)
    return False


def epoch_batches(loader: Loader, epoch: int = 0) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [sorted(y.tolist()) for _, y in loader]


# -- Loader -------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [True, False])
def test_batches_are_uint8_bchw(prefetch):
    images, targets = indexed_images(10, size=5, channels=3)
    loader = Loader(images, targets, np.arange(10), batch_size=4, prefetch=prefetch)
    batches = list(loader)
    assert len(loader) == 3 == len(batches)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 5, 5)
        assert x.device.type == "cpu"
        assert y.dtype == torch.int64
    grey = Loader(indexed_images(3, channels=1)[0], targets[:3], np.arange(3), batch_size=8)
    assert next(iter(grey))[0].shape == (3, 1, 4, 4)


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_targets_stay_aligned_with_images(prefetch, shuffle):
    images, _ = indexed_images(50)
    targets = torch.arange(50, dtype=torch.float32)[:, None] * 10  # regression-like (N, 1)
    rows = np.arange(3, 50, 2)
    loader = Loader(images, targets, rows, batch_size=7, shuffle=shuffle, prefetch=prefetch)
    seen = []
    for x, y in loader:
        row_of_pixels = x[:, 0, 0, 0].long()
        assert (x == x[:, :1, :1, :1]).all()  # every pixel of an image is its row index
        assert torch.equal(row_of_pixels.float() * 10, y[:, 0])
        seen += row_of_pixels.tolist()
    assert sorted(seen) == rows.tolist()


def test_every_row_exactly_once_per_epoch():
    images, targets = indexed_images(37)
    rows = np.arange(37)
    loader = Loader(images, targets, rows, batch_size=5, shuffle=True, seed=4)
    for epoch in range(3):
        seen = [v for batch in epoch_batches(loader, epoch) for v in batch]
        assert sorted(seen) == rows.tolist()


def test_shuffle_is_seeded_per_epoch():
    images, targets = indexed_images(64)
    rows = np.arange(64)

    def make(seed):
        return Loader(images, targets, rows, batch_size=8, shuffle=True, seed=seed)

    first = epoch_batches(make(1), 0)
    assert epoch_batches(make(1), 0) == first  # a resumed run sees the same order
    loader = make(1)
    epoch_batches(loader, 5)
    assert epoch_batches(loader, 0) == first
    assert epoch_batches(make(1), 1) != first
    assert epoch_batches(make(2), 0) != first
    unshuffled = Loader(images, targets, rows, batch_size=8)
    assert epoch_batches(unshuffled, 0) == [list(range(i, i + 8)) for i in range(0, 64, 8)]
    assert first != epoch_batches(unshuffled, 0)


def test_drop_last():
    images, targets = indexed_images(10)
    loader = Loader(images, targets, np.arange(10), batch_size=4, drop_last=True)
    assert len(loader) == 2
    assert [len(y) for _, y in loader] == [4, 4]
    shuffled = Loader(images, targets, np.arange(10), batch_size=4, drop_last=True, shuffle=True)
    assert [len(y) for _, y in shuffled] == [4, 4]
    exact = Loader(images, targets, np.arange(8), batch_size=4, drop_last=True)
    assert [len(y) for _, y in exact] == [4, 4]


def test_drop_last_never_drops_a_set_smaller_than_a_batch():
    images, targets = indexed_images(10)
    loader = Loader(images, targets, np.arange(3), batch_size=4, drop_last=True)
    assert len(loader) == 1
    assert [y.tolist() for _, y in loader] == [[0, 1, 2]]


def test_empty_rows_give_no_batches():
    images, targets = indexed_images(4)
    loader = Loader(images, targets, np.array([], dtype=np.int64), batch_size=4)
    assert len(loader) == 0 and list(loader) == []


@pytest.mark.parametrize("prefetch", [True, False])
def test_error_while_loading_reaches_the_consumer(prefetch):
    images, targets = indexed_images(20)
    loader = Loader(images, targets, np.arange(20), batch_size=4, prefetch=prefetch)
    real_load = loader._load
    calls = []

    def failing(index):
        calls.append(index)
        if len(calls) == 3:
            raise ValueError("disk on fire")
        return real_load(index)

    loader._load = failing
    received = []
    with pytest.raises(ValueError, match="disk on fire"):
        for _, y in loader:
            received.append(y.tolist())
    assert received == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert wait_for_no_loader_threads()


def test_bad_row_index_raises_in_the_consumer():
    images, targets = indexed_images(8)
    loader = Loader(images, targets, np.array([0, 1, 2, 99]), batch_size=2)
    with pytest.raises((IndexError, RuntimeError)):
        list(loader)
    assert wait_for_no_loader_threads()


def run_with_timeout(function, timeout: float = 20.0) -> None:
    errors = []

    def target():
        try:
            function()
        except BaseException as error:  # reported in the test thread
            errors.append(error)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the loader hung"
    if errors:
        raise errors[0]


def test_breaking_out_early_does_not_hang():
    images, targets = indexed_images(200, size=8)

    def consume():
        loader = Loader(images, targets, np.arange(200), batch_size=2)
        for _ in range(3):
            for i, _batch in enumerate(loader):
                if i == 1:
                    break
            assert wait_for_no_loader_threads()
        # the loader still gives whole epochs afterwards
        assert sum(len(y) for _, y in loader) == 200

    run_with_timeout(consume)


def test_closing_an_unfinished_iterator_stops_the_thread():
    images, targets = indexed_images(100)

    def consume():
        iterator = iter(Loader(images, targets, np.arange(100), batch_size=1, prefetch=True))
        next(iterator)
        queue = iterator.gi_frame.f_locals["queue"]
        deadline = time.monotonic() + 30
        while not queue.full() and time.monotonic() < deadline:  # the producer blocks on it
            time.sleep(0.001)
        assert queue.full()
        iterator.close()
        assert wait_for_no_loader_threads()

    run_with_timeout(consume)


# -- channel statistics -------------------------------------------------------------------


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 5, 6, 3), dtype=np.uint8)
    rows = np.array([1, 4, 5, 9, 20, 29])
    mean, std = channel_stats(images, rows)
    chosen = images[rows].astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, chosen.mean(axis=(0, 1, 2)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, chosen.std(axis=(0, 1, 2)), rtol=1e-7, atol=1e-9)
    assert isinstance(mean, list) and len(mean) == 3 and len(std) == 3


def test_channel_stats_of_a_constant_channel_do_not_divide_by_zero():
    images = np.full((4, 3, 3, 1), 100, dtype=np.uint8)
    mean, std = channel_stats(images, np.arange(4))
    assert mean == pytest.approx([100 / 255])
    assert std[0] > 0


def test_channel_stats_across_chunks(monkeypatch):
    import imagefit.data.prepare as prepare

    monkeypatch.setattr(prepare, "STATS_CHUNK_BYTES", 3 * 4 * 4 * 8)  # 3 images a chunk
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (11, 4, 4, 1), dtype=np.uint8)
    mean, std = channel_stats(images, np.arange(11))
    np.testing.assert_allclose(mean, [images.mean() / 255])
    np.testing.assert_allclose(std, [images.std() / 255], rtol=1e-7)


# -- BatchPipeline ------------------------------------------------------------------------


def random_batch(seed: int = 0, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, channels, 6, 6), generator=generator, dtype=torch.uint8)


def test_pipeline_without_transforms_normalizes_exactly():
    x = random_batch()
    mean, std = [0.2, 0.5, 0.7], [0.1, 0.25, 0.3]
    expected = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    pipeline = BatchPipeline(mean, std)
    y = torch.arange(4)
    trained, targets = pipeline.train_batch(x, y, torch.Generator().manual_seed(0))
    for out in (pipeline(x), trained):
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, y)


def test_validation_batches_are_never_augmented():
    x = random_batch()
    heavy = AugmentOptions(flip=1.0, rotate=90, erase_p=1.0, brightness=0.9, mixup=1.0)
    pipeline = BatchPipeline([0.5] * 3, [0.25] * 3, heavy, n_classes=4)
    plain = BatchPipeline([0.5] * 3, [0.25] * 3)
    torch.testing.assert_close(pipeline(x), plain(x))
    trained, _ = pipeline.train_batch(x, torch.arange(4), torch.Generator().manual_seed(0))
    assert not torch.allclose(trained, plain(x))


def test_training_with_a_preset_is_seeded():
    x = random_batch()
    pipeline = BatchPipeline([0.5] * 3, [0.25] * 3, resolve_augment("light"))
    a, _ = pipeline.train_batch(x, torch.arange(4), torch.Generator().manual_seed(3))
    b, _ = pipeline.train_batch(x, torch.arange(4), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape
    assert {"none", "light", "side_on", "top_down", "randaugment", "imagenet"} <= set(PRESETS)
    assert resolve_augment("none") == AugmentOptions()


# -- geometry (property tests) ------------------------------------------------------------

GEOMETRY = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def float_batches(draw, min_side: int = 1):
    batch = draw(st.integers(1, 4))
    channels = draw(st.sampled_from([1, 3]))
    height = draw(st.integers(min_side, 9))
    width = draw(st.integers(min_side, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, height, width, generator=generator)


@GEOMETRY
@given(x=float_batches(), seed=st.integers(0, 1000))
def test_flip_with_p_zero_is_identity(x, seed):
    out = flip_horizontal(x, torch.Generator().manual_seed(seed), p=0.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, x)


@GEOMETRY
@given(x=float_batches(), seed=st.integers(0, 1000))
def test_flip_with_p_one_mirrors_and_twice_is_identity(x, seed):
    generator = torch.Generator().manual_seed(seed)
    once = flip_horizontal(x, generator, p=1.0)
    assert torch.equal(once, x.flip(3))
    assert torch.equal(flip_horizontal(once, generator, p=1.0), x)


@GEOMETRY
@given(x=float_batches(), seed=st.integers(0, 1000))
def test_flip_flips_whole_images_or_nothing(x, seed):
    out = flip_horizontal(x, torch.Generator().manual_seed(seed), p=0.5)
    assert out.shape == x.shape and out.dtype == x.dtype
    for image, result in zip(x, out, strict=True):
        assert torch.equal(result, image) or torch.equal(result, image.flip(2))


@GEOMETRY
@given(x=float_batches(), seed=st.integers(0, 1000))
def test_shift_with_pad_zero_is_identity(x, seed):
    assert torch.equal(shift(x, torch.Generator().manual_seed(seed), pad=0), x)


@GEOMETRY
@given(x=float_batches(min_side=3), pad=st.integers(1, 2), seed=st.integers(0, 1000))
def test_shift_is_a_whole_pixel_shift_of_the_reflected_image(x, pad, seed):
    out = shift(x, torch.Generator().manual_seed(seed), pad=pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    height, width = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    for b in range(len(x)):
        candidates = [
            padded[b, :, dy:dy + height, dx:dx + width]
            for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
        ]
        assert any(torch.equal(out[b], c) for c in candidates)  # same shift on every channel


@GEOMETRY
@given(x=float_batches(min_side=3), seed=st.integers(0, 1000))
def test_same_seed_gives_same_augmentation(x, seed):
    for transform in (flip_horizontal, shift):
        a = transform(x, torch.Generator().manual_seed(seed))
        b = transform(x, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)


def test_shift_moves_some_images():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = shift(x, torch.Generator().manual_seed(0), pad=2)
    assert not torch.equal(out, x)


# -- sharded data: each rank reads its own rows -------------------------------------------


@pytest.mark.parametrize("world_size, batch_size, train", [(2, 8, True), (3, 7, True),
                                                           (2, 8, False), (3, 10, False)])
def test_sharded_ranks_read_their_own_rows_once_per_epoch(world_size, batch_size, train):
    """With sharded data every rank reads only its own share (training: a seeded deal),
    the shares together being every row once; all ranks take the same number of batches
    (DDP steps together), their parts of a global batch differing by one row at most;
    training reshuffles each share every epoch."""
    rows = np.arange(3, 104)
    shares = (distributed.training_shares(rows, seed=5, ranks=world_size) if train
              else distributed.evaluation_shares(rows, world_size))
    assert np.array_equal(np.sort(np.concatenate(shares)), rows)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    counts = [len(share) for share in shares]
    held = np.concatenate(shares)  # as one rank's cache would hold them: its own rows only
    loaders = []
    for rank, share in enumerate(shares):
        places = torch.full((110,), -1, dtype=torch.int64)
        places[torch.from_numpy(share)] = torch.arange(len(share))
        images = torch.from_numpy(share.astype(np.uint8)).reshape(-1, 1, 1, 1)
        loaders.append(Loader(images, torch.arange(110), share, batch_size, shuffle=train,
                              drop_last=train, seed=1, prefetch=False, rank=rank,
                              world_size=world_size, counts=counts, places=places))
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = [(x.flatten().long(), y) for x, y in loader]
            assert len(batches) == len(loaders[0])
            for x, y in batches:  # each image is the one of its row
                assert torch.equal(x, y % 256)
            per_rank.append([y for _, y in batches])
        for step in range(len(loaders[0])):
            sizes = [len(batches[step]) for batches in per_rank]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) <= batch_size
        seen = [torch.cat(batches) for batches in per_rank]
        for rank, rows_read in enumerate(seen):
            assert set(rows_read.tolist()) <= set(shares[rank].tolist())
            assert len(set(rows_read.tolist())) == len(rows_read)  # no row twice
        everything = torch.cat(seen)
        if train:  # drop_last leaves less than a batch per rank
            assert len(everything) > len(rows) - world_size * batch_size
        else:  # in order: gather puts rank 0's outputs, then rank 1's...
            assert torch.equal(everything, torch.from_numpy(held))
            for rank, loader in enumerate(loaders):
                assert torch.equal(everything[loader.share_positions(rank)], seen[rank])
        orders.append(seen[0])
    if train:
        assert not torch.equal(orders[0], orders[1])


def test_a_cache_is_held_on_a_gpu_only_when_it_takes_at_most_half_its_free_memory(
        monkeypatch):
    """The device-resident cache is chosen by size (here against a stand-in for
    torch.cuda.mem_get_info: no GPU on this machine); on a CPU the images stay where they
    are, the same tensor, and batches are gathered from them as before."""
    from imagefit.data import loader as loader_module

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    cuda = torch.device("cuda", 0)
    assert loader_module.fits_on_device(500, cuda)
    assert not loader_module.fits_on_device(501, cuda)
    assert not loader_module.fits_on_device(1, torch.device("cpu"))
    images = torch.zeros(4, 2, 2, 1, dtype=torch.uint8)
    assert loader_module.on_device_if_it_fits(images, "cpu") is images
    loader = Loader(images, torch.arange(4), np.arange(4), 2, device="cpu")
    assert not loader.prefetch
