"""The decode-once image cache: decoding of every common file kind, resizing, unreadable files,
reuse, invalidation, resumption of an interrupted build, and in-memory arrays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagefit.data.cache as cache_module
import imagefit.data.cache_folder as cache_folder
from imagefit.data.cache import (
    CacheSettings,
    build_cache,
    cache_arrays,
    cache_key,
    default_cache_root,
    warn_unreadable,
)
from imagefit.errors import ImagefitError, ImagefitWarning

REAL_DECODE = cache_module.decode_image


def save(path: Path, image: Image.Image, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


def grey(array) -> Image.Image:
    return Image.fromarray(np.asarray(array, dtype=np.uint8))


def build(paths, settings, **kwargs):
    kwargs.setdefault("progress", False)
    return build_cache(paths, settings, **kwargs)


class DecodeCounter:
    """Stands in for ``decode_image``: records the paths it decodes (from any thread)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.fail_after = fail_after

    def __call__(self, path, settings):
        with self.lock:
            if self.fail_after is not None and len(self.paths) >= self.fail_after:
                raise KeyboardInterrupt
            self.paths.append(path)
        return REAL_DECODE(path, settings)


def many_images(folder: Path, count: int) -> list[str]:
    return [
        save(folder / f"im{i:04d}.png", grey(np.full((6, 6), i % 256))) for i in range(count)
    ]


# -- decoding -----------------------------------------------------------------------------


def test_class_folder_images_decode_to_settings(class_folder):
    paths = sorted(str(p) for p in class_folder.rglob("*.*"))
    for channels in (1, 3):
        cache = build(paths, CacheSettings(size=16, channels=channels))
        assert cache.images.shape == (72, 16, 16, channels)
        assert cache.images.dtype == np.uint8
        assert cache.errors == {} and cache.failed == []
        assert len(cache) == 72
        for row in (0, 1, 5, 71):
            with Image.open(paths[row]) as img:
                assert tuple(cache.original_sizes[row]) == img.size
        assert cache.tensor().shape == (72, 16, 16, channels)


def test_png_and_jpeg_grey_and_rgb_keep_their_content(tmp_path):
    rgb = np.zeros((24, 24, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 30
    wide = np.zeros((24, 24), dtype=np.uint8) + 180
    paths = [
        save(tmp_path / "rgb.png", Image.fromarray(rgb)),
        save(tmp_path / "rgb.jpg", Image.fromarray(rgb), quality=95),
        save(tmp_path / "grey.png", grey(wide)),
        save(tmp_path / "grey.jpg", grey(wide), quality=95),
    ]
    colour = build(paths, CacheSettings(size=24, channels=3)).images.astype(int)
    np.testing.assert_array_equal(colour[0], rgb)
    assert np.abs(colour[1] - rgb).max() <= 6
    # grey files give three equal channels
    assert (colour[2] == 180).all()
    assert np.abs(colour[3] - 180).max() <= 3
    mono = build(paths, CacheSettings(size=24, channels=1)).images.astype(int)
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 30)
    assert np.abs(mono[0] - expected).max() <= 1
    assert (mono[2] == 180).all()


def test_mixed_sizes_record_width_and_height(tmp_path):
    shapes = [(10, 30), (30, 10), (17, 17), (64, 40)]  # (height, width)
    paths = [save(tmp_path / f"im{i}.png", grey(np.zeros(s))) for i, s in enumerate(shapes)]
    paths.append(save(tmp_path / "big.jpg", grey(np.zeros((300, 500))), quality=90))
    cache = build(paths, CacheSettings(size=8, channels=1, resize="squish"))
    assert cache.original_sizes.tolist() == [[30, 10], [10, 30], [17, 17], [40, 64], [500, 300]]
    assert cache.images.shape == (5, 8, 8, 1)


def test_rgba_palette_16bit_and_cmyk_decode_to_channels(tmp_path):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, :15] = (0, 0, 255, 255)  # left: opaque blue; right: fully transparent
    palette_rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    palette_rgb[..., 0] = 200
    deep = np.zeros((20, 30), dtype=np.uint16)
    deep[:, 10:20] = 65535
    paths = [
        save(tmp_path / "rgba.png", Image.fromarray(rgba)),
        save(tmp_path / "palette.png", Image.fromarray(palette_rgb).convert("P")),
        save(tmp_path / "deep.png", Image.fromarray(deep)),
        save(tmp_path / "cmyk.jpg", Image.new("CMYK", (30, 20), (0, 255, 255, 0)), quality=95),
    ]
    with Image.open(paths[1]) as img:
        assert img.mode == "P"
    with Image.open(paths[2]) as img:
        assert img.mode.startswith("I;16")
    with Image.open(paths[3]) as img:
        assert img.mode == "CMYK"
    for channels in (1, 3):
        cache = build(paths, CacheSettings(size=20, channels=channels, resize="squish"))
        assert cache.errors == {}
        assert cache.images.shape == (4, 20, 20, channels)
        assert cache.original_sizes.tolist() == [[30, 20]] * 4
    colour = build(paths, CacheSettings(size=20, channels=3, resize="squish")).images.astype(int)
    assert colour[0, 10, 0].tolist() == [0, 0, 255]  # opaque part kept
    assert colour[0, 10, 19].tolist() == [255, 255, 255]  # transparency on white
    assert np.abs(colour[1, 10, 10] - [200, 0, 0]).max() <= 4
    assert colour[2, 10, 0].tolist() == [0, 0, 0]  # 16-bit black stays black
    assert colour[2, 10, 10].tolist() == [255, 255, 255]  # 16-bit white is 255
    assert np.abs(colour[3, 10, 10] - [255, 0, 0]).max() <= 6  # CMYK red is red


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    array = np.zeros((20, 40), dtype=np.uint8)
    array[:, :20] = 255  # stored landscape, left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path / "turned.jpg", grey(array), exif=exif, quality=95)
    cache = build([path], CacheSettings(size=20, channels=1, resize="squish"))
    assert cache.original_sizes.tolist() == [[20, 40]]  # displayed width, height
    image = cache.images[0, :, :, 0].astype(int)
    assert image[:8].mean() > 200 and image[12:].mean() < 50  # the white half is on top


# -- resizing -----------------------------------------------------------------------------


def test_crop_keeps_the_centre(tmp_path):
    array = np.zeros((20, 60), dtype=np.uint8)
    array[:, 20:40] = 255
    path = save(tmp_path / "wide.png", grey(array))
    image = build([path], CacheSettings(size=10, channels=1, resize="crop")).images[0, ..., 0]
    assert (image[:, 1:-1] >= 250).all() and image.mean() > 240
    tall = save(tmp_path / "tall.png", grey(array.T))
    image = build([tall], CacheSettings(size=10, channels=1, resize="crop")).images[0, ..., 0]
    assert (image[1:-1] >= 250).all() and image.mean() > 240


def test_pad_leaves_black_borders_on_a_wide_image(tmp_path):
    path = save(tmp_path / "wide.png", grey(np.full((20, 40), 255)))
    image = build([path], CacheSettings(size=20, channels=1, resize="pad")).images[0, ..., 0]
    assert (image[:5] == 0).all() and (image[15:] == 0).all()
    assert (image[5:15] == 255).all()
    colour = build([path], CacheSettings(size=20, channels=3, resize="pad")).images[0]
    assert (colour[:5] == 0).all() and (colour[5:15] == 255).all()


def test_squish_keeps_everything(tmp_path):
    array = np.zeros((20, 40), dtype=np.uint8)
    array[:, 20:] = 255
    path = save(tmp_path / "wide.png", grey(array))
    image = build([path], CacheSettings(size=20, channels=1, resize="squish")).images[0, ..., 0]
    assert (image[:, :9] <= 5).all() and (image[:, 11:] >= 250).all()


def test_image_of_the_target_size_is_stored_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = save(tmp_path / "exact.png", Image.fromarray(array))
    for resize in ("crop", "squish", "pad"):
        cache = build([path], CacheSettings(size=16, channels=3, resize=resize))
        np.testing.assert_array_equal(cache.images[0], array)


# -- unreadable files ---------------------------------------------------------------------


def unreadable_set(tmp_path: Path) -> list[str]:
    good = [save(tmp_path / f"ok{i}.png", grey(np.full((8, 8), 50 * i))) for i in range(3)]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    return [good[0], str(corrupt), good[1], str(text), good[2]]


def test_unreadable_files_are_recorded_and_warned_about(tmp_path):
    paths = unreadable_set(tmp_path)
    cache = build(paths, CacheSettings(size=8, channels=1))
    assert cache.failed == [1, 3]
    assert set(cache.errors) == {1, 3} and all(cache.errors.values())
    assert cache.images[0].max() == 0 and cache.images[2].min() == 50
    assert cache.images[4].min() == 100
    with pytest.warns(ImagefitWarning) as record:
        warn_unreadable(cache, paths)
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 unreadable" in message
    assert "corrupt.png" in message and "notes.txt" in message and "ok0.png" not in message
    assert "--strict" in message


def test_warning_lists_at_most_five_files(tmp_path):
    paths = []
    for i in range(7):
        bad = tmp_path / f"bad{i}.png"
        bad.write_bytes(b"garbage")
        paths.append(str(bad))
    cache = build(paths, CacheSettings(size=8, channels=1))
    with pytest.warns(ImagefitWarning, match="7 unreadable") as record:
        warn_unreadable(cache, paths)
    message = str(record[0].message)
    assert "bad4.png" in message and "bad5.png" not in message and "2 more" in message


def test_no_warning_when_everything_is_readable(tmp_path):
    paths = [save(tmp_path / "a.png", grey(np.zeros((8, 8))))]
    cache = build(paths, CacheSettings(size=8, channels=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unreadable(cache, paths)


def test_strict_raises_naming_the_file(tmp_path):
    paths = unreadable_set(tmp_path)
    with pytest.raises(ImagefitError, match="corrupt.png") as info:
        build(paths, CacheSettings(size=8, channels=1), strict=True)
    assert "not a readable image" in str(info.value) and "--strict" in str(info.value)


def test_strict_raises_when_opening_a_cache_with_errors(tmp_path):
    paths = unreadable_set(tmp_path)
    settings = CacheSettings(size=8, channels=1)
    build(paths, settings)  # a lenient build records the errors
    with pytest.raises(ImagefitError, match="corrupt.png"):
        build(paths, settings, strict=True)


# -- reuse and invalidation ---------------------------------------------------------------


def test_second_build_opens_the_cache_without_decoding(tmp_path, monkeypatch):
    paths = unreadable_set(tmp_path)
    settings = CacheSettings(size=8, channels=3)
    counter = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    first = build(paths, settings)
    assert sorted(counter.paths) == sorted(paths)
    first_images = np.array(first.images)
    counter.paths.clear()
    second = build(paths, settings)
    assert counter.paths == []
    np.testing.assert_array_equal(second.images, first_images)
    np.testing.assert_array_equal(second.original_sizes, first.original_sizes)
    assert second.errors == first.errors


def test_cache_lives_under_imagefit_cache(tmp_path, isolated_cache):
    paths = [save(tmp_path / "a.png", grey(np.zeros((8, 8))))]
    settings = CacheSettings(size=8, channels=1)
    build(paths, settings)
    assert default_cache_root() == isolated_cache / "images"
    assert (isolated_cache / "images" / cache_key(paths, settings)).is_dir()
    other = tmp_path / "elsewhere"
    build(paths, settings, root=other)
    assert (other / cache_key(paths, settings)).is_dir()


def test_cache_key_changes_with_the_file_list_and_settings(tmp_path):
    paths = [save(tmp_path / f"im{i}.png", grey(np.full((8, 8), i))) for i in range(3)]
    settings = CacheSettings(size=8, channels=1)
    key = cache_key(paths, settings)
    assert cache_key(list(paths), CacheSettings(size=8, channels=1)) == key
    assert cache_key(paths, CacheSettings(size=9, channels=1)) != key
    assert cache_key(paths, CacheSettings(size=8, channels=3)) != key
    assert cache_key(paths, CacheSettings(size=8, channels=1, resize="pad")) != key
    assert cache_key(paths[:2], settings) != key
    assert cache_key(paths[::-1], settings) != key


def test_a_vanished_file_is_an_error(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(ImagefitError, match="gone.png disappeared") as info:
        build([str(path)], CacheSettings(size=8, channels=1))
    assert "restore it or remove it" in str(info.value)


def test_changed_file_alone_is_decoded_again_in_place(tmp_path, monkeypatch, isolated_cache):
    paths = [save(tmp_path / f"im{i}.png", grey(np.full((8, 8), 10 * i))) for i in range(3)]
    settings = CacheSettings(size=8, channels=1)
    assert build(paths, settings).images[1].max() == 10
    stat = os.stat(paths[1])
    save(Path(paths[1]), grey(np.full((8, 8), 99)))
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    counter = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    cache = build(paths, settings)
    assert counter.paths == [paths[1]]  # one decode, not a new copy of everything
    assert cache.images[1].min() == 99 and cache.images[2].min() == 20
    assert len(list((isolated_cache / "images").iterdir())) == 1


def test_a_rewrite_keeping_size_and_mtime_is_noticed(tmp_path, monkeypatch):
    """cp then touch -r: same size, same modification time, other pixels; the change time
    (which no one can set back) tells."""
    paths = [save(tmp_path / "a.png", grey(np.full((8, 8), 10)))]
    settings = CacheSettings(size=8, channels=1)
    assert build(paths, settings).images[0].max() == 10
    before = os.stat(paths[0])
    replacement = tmp_path / "b.png"
    save(replacement, grey(np.full((8, 8), 200)))
    data = replacement.read_bytes()
    assert len(data) == before.st_size  # the same size: a constant image compresses alike
    Path(paths[0]).write_bytes(data)
    os.utime(paths[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(paths[0]).st_mtime_ns == before.st_mtime_ns
    assert build(paths, settings).images[0].min() == 200


def test_a_grown_file_list_borrows_the_rows_it_shares(tmp_path, monkeypatch):
    paths = [save(tmp_path / f"im{i}.png", grey(np.full((8, 8), i))) for i in range(6)]
    settings = CacheSettings(size=8, channels=1)
    build(paths[:5], settings)
    counter = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    grown = build(paths, settings)
    assert counter.paths == [paths[5]]
    assert [int(grown.images[i].max()) for i in range(6)] == list(range(6))
    np.testing.assert_array_equal(grown.content_hashes()[:5], build(paths[:5],
                                                                    settings).content_hashes())


def test_content_hashes_tell_equal_pixels(tmp_path):
    paths = [save(tmp_path / "a.png", grey(np.full((8, 8), 3))),
             save(tmp_path / "b.png", grey(np.full((8, 8), 3))),
             save(tmp_path / "c.png", grey(np.full((8, 8), 4)))]
    hashes = build(paths, CacheSettings(size=8, channels=1)).content_hashes()
    assert hashes.shape == (3, 16)
    assert (hashes[0] == hashes[1]).all() and not (hashes[0] == hashes[2]).all()
    arrays = cache_arrays(np.stack([np.full((8, 8, 1), v, np.uint8) for v in (3, 3, 4)]),
                          CacheSettings(size=8, channels=1))
    np.testing.assert_array_equal(arrays.content_hashes(), hashes)


# -- the size limit -----------------------------------------------------------------------


def _dataset(folder: Path, count: int, side: int = 64) -> list[str]:
    rng = np.random.default_rng(count)
    return [save(folder / f"im{i}.png", grey(rng.integers(0, 255, (side, side))))
            for i in range(count)]


def test_caches_over_the_limit_are_evicted_least_recently_used_first(tmp_path, monkeypatch,
                                                                        isolated_cache):
    settings = CacheSettings(size=64, channels=1)
    old, recent = _dataset(tmp_path / "old", 40), _dataset(tmp_path / "recent", 41)
    first = build(old, settings)
    second = build(recent, settings)
    one = cache_folder.folder_bytes(first.folder)
    del first, second  # no longer in use
    os.utime(cache_module.default_cache_root() / cache_key(old, settings) / "use.lock",
             (1, 1))  # used long ago
    monkeypatch.setenv("IMAGEFIT_CACHE_LIMIT", str(int(2.5 * one)))
    build(_dataset(tmp_path / "new", 42), settings)
    keys = {e["key"] for e in cache_folder.list_caches()}
    assert cache_key(old, settings) not in keys
    assert cache_key(recent, settings) in keys and len(keys) == 2


def test_a_cache_in_use_is_never_evicted(tmp_path, monkeypatch):
    settings = CacheSettings(size=64, channels=1)
    in_use = build(_dataset(tmp_path / "a", 40), settings)  # held open by this test
    os.utime(in_use.folder / "use.lock", (1, 1))
    monkeypatch.setenv("IMAGEFIT_CACHE_LIMIT", "1")
    build(_dataset(tmp_path / "b", 41), settings)
    assert in_use.folder.is_dir()
    assert int(in_use.images[3].sum()) > 0
    assert {e["key"]: e["in_use"] for e in cache_folder.list_caches()} == {
        in_use.folder.name: True, cache_key(_dataset(tmp_path / "b", 41), settings): False}


def test_cache_limit_parses_sizes(monkeypatch):
    for text, expected in [("20G", 20 << 30), ("500M", 500 << 20), ("1.5k", 1536), ("0", 0),
                           ("4096", 4096), ("2GiB", 2 << 30)]:
        monkeypatch.setenv("IMAGEFIT_CACHE_LIMIT", text)
        assert cache_folder.cache_limit() == expected
    monkeypatch.setenv("IMAGEFIT_CACHE_LIMIT", "lots")
    with pytest.raises(ImagefitError, match=r"IMAGEFIT_CACHE_LIMIT: 'lots' is not a size; "
                       r"write it like 20G, 500M or 0"):
        cache_folder.cache_limit()


def test_cache_command_lists_and_clears(tmp_path, capsys):
    from imagefit.cli import main

    settings = CacheSettings(size=8, channels=1)
    paths = [save(tmp_path / f"im{i}.png", grey(np.full((8, 8), i))) for i in range(3)]
    build(paths, settings, description="my photos")
    held = build(paths[:2], settings, description="kept open")
    assert main(["cache", "ls"]) == 0
    listing = capsys.readouterr().out
    assert "2 cache(s)" in listing and "my photos" in listing and "in use" in listing
    assert main(["cache", "clear"]) == 0
    assert "removed 1 cache(s)" in capsys.readouterr().out  # the other one is in use
    assert held.folder.is_dir() and held.images.shape == (2, 8, 8, 1)
    assert [e["description"] for e in cache_folder.list_caches()] == ["kept open"]


def test_changed_settings_decode_again(tmp_path, monkeypatch):
    paths = [save(tmp_path / "a.png", grey(np.zeros((8, 12))))]
    build(paths, CacheSettings(size=8, channels=1))
    counter = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    cache = build(paths, CacheSettings(size=4, channels=3, resize="squish"))
    assert counter.paths == paths
    assert cache.images.shape == (1, 4, 4, 3)


def test_cached_images_are_not_changed_by_writes(tmp_path):
    paths = [save(tmp_path / "a.png", grey(np.full((8, 8), 7)))]
    settings = CacheSettings(size=8, channels=1)
    cache = build(paths, settings)
    cache.images[0] = 200  # a copy-on-write view: the file on disk keeps its content
    assert build(paths, settings).images[0].max() == 7


# -- interrupted builds -------------------------------------------------------------------


def test_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    paths = many_images(tmp_path / "imgs", 40)
    settings = CacheSettings(size=4, channels=1, resize="squish")
    monkeypatch.setattr(cache_module, "CHUNK", 8)

    interrupting = DecodeCounter(fail_after=20)
    monkeypatch.setattr(cache_module, "decode_image", interrupting)
    with pytest.raises(KeyboardInterrupt):
        build(paths, settings, threads=2)
    folder = default_cache_root() / cache_key(paths, settings)
    assert not (folder / "meta.json").exists()  # not taken for a finished cache

    resuming = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", resuming)
    resumed = build(paths, settings, threads=2)
    never_decoded = set(paths) - set(interrupting.paths)
    assert never_decoded <= set(resuming.paths)
    assert not set(resuming.paths) & set(paths[:16])  # finished chunks are kept
    assert len(resuming.paths) < len(paths)
    assert len(resuming.paths) == len(set(resuming.paths))

    clean = build(paths, settings, root=tmp_path / "clean")
    np.testing.assert_array_equal(resumed.images, clean.images)
    np.testing.assert_array_equal(resumed.original_sizes, clean.original_sizes)
    assert resumed.errors == clean.errors == {}
    assert [int(v) for v in resumed.images[:, 0, 0, 0]] == [i % 256 for i in range(40)]

    resuming.paths.clear()
    build(paths, settings)
    assert resuming.paths == []


def test_interrupted_build_keeps_errors_of_finished_chunks(tmp_path, monkeypatch):
    paths = many_images(tmp_path / "imgs", 12)
    (tmp_path / "imgs" / "im0001.png").write_bytes(b"broken")
    settings = CacheSettings(size=4, channels=1)
    monkeypatch.setattr(cache_module, "CHUNK", 4)
    monkeypatch.setattr(cache_module, "decode_image", DecodeCounter(fail_after=6))
    with pytest.raises(KeyboardInterrupt):
        build(paths, settings, threads=1)
    progress = default_cache_root() / cache_key(paths, settings) / "progress.json"
    assert json.loads(progress.read_text())["done"] == 4
    monkeypatch.setattr(cache_module, "decode_image", DecodeCounter())
    cache = build(paths, settings)
    assert cache.failed == [1]
    assert not progress.exists()


def test_default_chunked_build_of_many_images(tmp_path, monkeypatch):
    paths = many_images(tmp_path / "imgs", 300)  # more than one chunk of 256
    counter = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    cache = build(paths, CacheSettings(size=6, channels=1))
    assert sorted(counter.paths) == sorted(paths)
    assert [int(v) for v in cache.images[:, 3, 3, 0]] == [i % 256 for i in range(300)]


# -- arrays -------------------------------------------------------------------------------


def test_cache_arrays_converts_channels():
    rgb = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    to_grey = cache_arrays(rgb, CacheSettings(size=8, channels=1))
    assert to_grey.images.shape == (2, 8, 8, 1)
    assert (to_grey.images == round(0.299 * 10 + 0.587 * 20 + 0.114 * 30)).all()
    mono = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    to_rgb = cache_arrays(mono, CacheSettings(size=8, channels=3))
    assert to_rgb.images.shape == (2, 8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(to_rgb.images[..., c], mono[..., 0])
    assert to_rgb.errors == {} and to_rgb.original_sizes.tolist() == [[8, 8], [8, 8]]


def test_cache_arrays_resizes_and_records_sizes():
    images = np.full((3, 6, 10, 1), 77, dtype=np.uint8)
    for resize in ("crop", "squish"):
        cache = cache_arrays(images, CacheSettings(size=12, channels=1, resize=resize))
        assert cache.images.shape == (3, 12, 12, 1) and cache.images.dtype == np.uint8
        assert (cache.images == 77).all()
        assert cache.original_sizes.tolist() == [[10, 6]] * 3
    padded = cache_arrays(images, CacheSettings(size=10, channels=1, resize="pad")).images
    assert (padded[:, :2] == 0).all() and (padded[:, -2:] == 0).all()
    assert (padded[:, 3:7] == 77).all()


def test_cache_arrays_crop_keeps_the_centre():
    images = np.zeros((1, 4, 12, 1), dtype=np.uint8)
    images[:, :, 4:8] = 255
    cache = cache_arrays(images, CacheSettings(size=4, channels=1, resize="crop"))
    assert (cache.images == 255).all()


def test_cache_arrays_of_the_right_size_are_unchanged():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    cache = cache_arrays(images, CacheSettings(size=8, channels=3))
    np.testing.assert_array_equal(cache.images, images)


# -- shards (one rank's rows of a multi-machine fit) --------------------------------------


def test_a_shard_decodes_stores_and_checks_only_its_rows(tmp_path, monkeypatch):
    """A shard's cache holds its rows alone (the file is its share of the whole one's
    size), never opens the other files (a broken one among them is not its error), and
    reads a row it lacks by decoding that file, equal to the whole cache's row."""
    paths = many_images(tmp_path / "img", 40)
    (tmp_path / "img" / "im0003.png").write_bytes(b"not an image")  # in no shard below
    settings = CacheSettings(size=8, channels=1)
    rows = np.array([0, 5, 6, 17, 39])
    counter = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    shard = build(paths, settings, rows=rows[::-1])
    assert sorted(counter.paths) == [paths[r] for r in rows]
    assert shard.images.shape[0] == len(rows) and len(shard) == 40
    assert shard.errors == {}
    image_bytes = (shard.folder / "images.u8").stat().st_size
    assert image_bytes == len(rows) * 8 * 8
    np.testing.assert_array_equal(shard.held, rows)
    assert shard.places()[rows].tolist() == list(range(len(rows)))
    assert (shard.places() == -1).sum() == 40 - len(rows)
    monkeypatch.setattr(cache_module, "decode_image", REAL_DECODE)
    whole = build(paths, settings)
    assert whole.errors.keys() == {3}
    wanted = np.array([39, 1, 5])  # 1 is not held: decoded when asked for
    np.testing.assert_array_equal(shard.read(wanted), whole.images[wanted])
    counter.paths.clear()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    again = build(paths, settings, rows=rows)
    assert counter.paths == [] and again.folder == shard.folder
    other = build(paths, settings, rows=np.array([1, 2]))  # borrowed from the whole cache
    assert counter.paths == [] and other.folder != shard.folder
    np.testing.assert_array_equal(other.images, whole.images[[1, 2]])


def test_a_shard_decodes_again_only_its_changed_files(tmp_path, monkeypatch):
    paths = many_images(tmp_path / "img", 12)
    settings = CacheSettings(size=8, channels=1)
    rows = np.array([2, 7, 11])
    build(paths, settings, rows=rows)
    save(Path(paths[7]), grey(np.full((6, 6), 200)))
    save(Path(paths[8]), grey(np.full((6, 6), 201)))  # not the shard's
    counter = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    shard = build(paths, settings, rows=rows)
    assert counter.paths == [paths[7]]
    assert shard.images[1].max() == 200


# -- two processes ------------------------------------------------------------------------

BUILDER = """
import json, os, sys, threading, time
from pathlib import Path

import imagefit.data.cache as cache

me, root, images, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
other = 1 - me
paths = sorted(str(path) for path in images.glob("*.png"))
decoded, waited, first = [], [], threading.Lock()
real_decode = cache.decode_image


def other_waits_on_a_lock(pid):
    lines = Path("/proc/locks").read_text().splitlines()
    return any(" -> FLOCK " in line and f" {pid} " in line for line in lines)


def decode(path, settings):
    with first:  # the first decode of this process: hold it until the other is blocked
        if not decoded:
            pid = int((out / f"pid{other}").read_text())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    (out / f"entered{other}").exists() and other_waits_on_a_lock(pid)):
                time.sleep(0.02)
            waited.append(other_waits_on_a_lock(pid))
        decoded.append(path)
    return real_decode(path, settings)


cache.decode_image = decode
(out / f"pid{me}.tmp").write_text(str(os.getpid()))
(out / f"pid{me}.tmp").replace(out / f"pid{me}")
while not (out / "go").exists():
    time.sleep(0.02)
(out / f"entered{me}").touch()
built = cache.build_cache(paths, cache.CacheSettings(size=16, channels=1), root,
                          progress=False)
(out / f"result{me}.json").write_text(json.dumps({
    "decoded": len(decoded), "saw_the_other_wait": waited == [True],
    "folder": str(built.folder)}))
"""


def test_two_processes_building_one_cache_at_once_make_one_correct_cache(tmp_path,
                                                                         monkeypatch):
    """Two processes start building the cache of the same 300 PNGs at the same moment: the
    first to take the build lock decodes every image once (holding its first decode until
    /proc/locks shows the other process blocked on the lock), the other then opens that
    cache without decoding; one cache folder results, whose images are the files' pixels
    decoded independently here."""
    rng = np.random.default_rng(0)
    paths = [save(tmp_path / "pngs" / f"im{i:04d}.png", grey(rng.integers(0, 256, (16, 16))))
             for i in range(300)]
    root, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    script = tmp_path / "build.py"
    script.write_text(BUILDER)
    builders = [subprocess.Popen([sys.executable, str(script), str(k), str(root),
                                  str(tmp_path / "pngs"), str(out)],
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
                for k in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all((out / f"pid{k}").exists() for k in range(2)):  # both imported
            assert all(b.poll() is None for b in builders), builders[0].stderr.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (out / "go").touch()
        for builder in builders:
            assert builder.wait(timeout=120) == 0, builder.stderr.read()[-2000:]
    finally:
        for builder in builders:
            builder.kill()
            builder.wait()
    results = [json.loads((out / f"result{k}.json").read_text()) for k in range(2)]
    assert sorted(r["decoded"] for r in results) == [0, 300]
    assert [r["saw_the_other_wait"] for r in results if r["decoded"]] == [True]
    (folder,) = {r["folder"] for r in results}
    assert [p.name for p in root.iterdir()] == [Path(folder).name]  # one cache
    counter = DecodeCounter()
    monkeypatch.setattr(cache_module, "decode_image", counter)
    cache = build(paths, CacheSettings(size=16, channels=1), root=root)
    assert counter.paths == [] and str(cache.folder) == folder
    expected = np.stack([np.asarray(Image.open(path)) for path in paths])[..., None]
    np.testing.assert_array_equal(cache.images, expected)
    assert cache.errors == {} and cache.failed == []
