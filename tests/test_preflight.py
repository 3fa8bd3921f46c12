"""The preflight of a fit's resources: an image size, batch or text length that cannot fit is
refused (or, for the automatic text length, capped) at once, before anything is cached or
allocated, naming the option and the largest value that fits; the cache itself refuses what
its disk cannot hold and leaves nothing of a build that failed before its first chunk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import imagefit.data.cache as cache_module
import imagefit.workflows.preflight as preflight
from conftest import shape_image, write_image
from imagefit.cli import main
from imagefit.config import FitConfig, ShowBatchOptions
from imagefit.data.cache import CacheSettings, build_cache, cache_key, default_cache_root
from imagefit.data.resources import available_memory, format_bytes, largest_that_fits
from imagefit.data.sources import read_source
from imagefit.data.text import TEXT_LENGTH_CEILING, automatic_text_length
from imagefit.errors import ImagefitError, ImagefitWarning

GB = 10**9


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """Two classes of four 24 px grey PNGs."""
    rng = np.random.default_rng(0)
    for kind, name in enumerate(["square", "hbar"]):
        for i in range(4):
            write_image(tmp_path / "tiny" / name / f"{i}.png", shape_image(kind, 24, rng, False))
    return tmp_path / "tiny"


def run_cli(args: list[str], log: Path) -> tuple[int, str, float, int]:
    """``python -m imagefit ARGS`` in a child process: its exit code, its output, its wall
    time and its own peak resident memory in bytes (os.wait4's usage of that child alone)."""
    with open(log, "w") as sink:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, *args], stdout=sink, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, log.read_text(), elapsed, usage.ru_maxrss * 1024


def test_a_huge_image_size_is_refused_at_once_without_memory_or_cache(tiny_folder, tmp_path,
                                                                       isolated_cache):
    """The hostile fit of issue 32 (--image-size 100000 grew to 24 GB and was killed after
    103 s, leaving a 1.2 TB sparse file): refused in one line. Where one such image alone
    (40 GB as 32-bit numbers) exceeds the memory available, the command line refuses it
    before torch is imported: under 5 s, at a few tens of MB. On a machine with more memory
    the preflight does, within 5 s of imagefit's own start-up (its imports, measured here in
    the same way), at the memory of that start-up, naming the largest size that fits."""
    code, _, startup, startup_memory = run_cli(["-c", "import imagefit.api"],
                                               tmp_path / "startup.txt")
    assert code == 0
    runs = tmp_path / "runs"
    code, output, elapsed, memory = run_cli(
        ["-m", "imagefit", "fit", str(tiny_folder), "--image-size", "100000", "--epochs", "1",
         "--runs-dir", str(runs)], tmp_path / "fit.txt")
    lines = output.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("imagefit: error: --image-size 100000: ")
    if available_memory() < 40 * GB:
        assert "one image alone would take 40 GB of memory" in lines[0]
        # (the child's peak counts the test process it was forked from: compare with the
        # start-up, measured the same way)
        assert elapsed < 5 and memory <= startup_memory, (elapsed, memory, startup_memory)
    else:
        largest = int(re.search(r"the largest size that fits is (\d+)", lines[0]).group(1))
        assert 4 <= largest < 100_000
        assert re.search(r"a training step on a batch of \d+ would take about \d+ TB", lines[0])
        assert elapsed < 5 + 2 * startup, (elapsed, startup)
        assert memory < 2 * GB and memory < startup_memory + 400 * 2**20, (memory,
                                                                           startup_memory)
    cache_root = Path(os.environ["IMAGEFIT_CACHE"])
    assert not cache_root.exists() or not any(cache_root.iterdir())
    assert not runs.exists()


@pytest.mark.parametrize("disk, memory, short", [(30_000, 100 * GB, "image cache"),
                                                 (100 * GB, 3 * GB, "training step")])
def test_the_largest_size_proposed_fits_and_one_more_does_not(tiny_folder, monkeypatch, disk,
                                                              memory, short):
    """The estimator on a machine short of disk, then of memory: the size it proposes passes
    the same preflight, one pixel more is refused."""
    monkeypatch.setattr(preflight, "available_memory", lambda: memory)
    monkeypatch.setattr(preflight, "free_disk", lambda folder: disk)
    table = read_source(str(tiny_folder))

    def check(size: int) -> None:
        cfg = FitConfig(image_size=size, model="resnet18", bs=8)
        preflight.check_image_room(table, CacheSettings(size, 1), cfg, 8)

    with pytest.raises(ImagefitError) as refused:
        check(4096)
    message = str(refused.value)
    assert message.startswith(f"--image-size 4096: the {short}" if short == "image cache"
                              else f"--image-size 4096: a {short}")
    largest = int(re.search(r"the largest size that fits is (\d+)", message).group(1))
    check(largest)
    with pytest.raises(ImagefitError, match=short):
        check(largest + 1)


def test_a_batch_too_large_names_bs_and_the_largest_batch(tiny_folder, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: 2 * GB)
    table = read_source(str(tiny_folder))
    cfg = FitConfig(model="resnet18", bs=64)
    with pytest.raises(ImagefitError) as refused:
        preflight.check_image_room(table, CacheSettings(224, 3), cfg, 64)
    message = str(refused.value)
    assert message.startswith("--bs 64: a training step on a batch of 64 would take about ")
    batch = int(re.search(r"the largest batch that fits is (\d+)", message).group(1))
    preflight.check_image_room(table, CacheSettings(224, 3), cfg, batch)
    with pytest.raises(ImagefitError):
        preflight.check_image_room(table, CacheSettings(224, 3), cfg, batch + 1)


def test_a_head_too_wide_for_memory_names_head_hidden(tiny_folder):
    table = read_source(str(tiny_folder))
    cfg = FitConfig(model="resnet18", head="mlp", head_hidden=10**9)
    with pytest.raises(ImagefitError, match=r"^--head-hidden 1000000000: the model's weights, "
                       r"with their gradients and optimizer moments, would take 16 EB "):
        preflight.check_image_room(table, CacheSettings(32, 1), cfg, 8)


def test_tune_workers_are_refused_beyond_what_memory_holds(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: 5 * GB)
    preflight.check_workers_room(4)
    with pytest.raises(ImagefitError, match=r"^--workers 5: .* the most that fit is 4$"):
        preflight.check_workers_room(5)


def test_the_preflight_of_a_large_model_takes_well_under_five_seconds(tiny_folder):
    table = read_source(str(tiny_folder))
    started = time.perf_counter()
    with pytest.raises(ImagefitError, match="--image-size 100000: "):
        preflight.check_image_room(table, CacheSettings(100_000, 3),
                                   FitConfig(image_size=100_000, model="resnet50"), 8)
    assert time.perf_counter() - started < 5


def test_show_batch_counts_its_grid_and_no_model(tiny_folder, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: GB)
    table = read_source(str(tiny_folder))
    cfg = ShowBatchOptions(image_size=20_000)
    with pytest.raises(ImagefitError) as refused:
        preflight.check_image_room(table, CacheSettings(20_000, 1), cfg, cfg.n_images)
    assert "training step" not in str(refused.value)
    assert "the largest size that fits is" in str(refused.value)


def test_a_summary_too_large_for_memory_is_refused_before_its_forward_pass(monkeypatch):
    import imagefit.models.zoo as zoo
    from imagefit.models import create_model

    pytest.importorskip("torchinfo")
    monkeypatch.setattr(zoo, "available_memory", lambda: GB)
    model = create_model("small_cnn", 3, 2)  # a run's model: real weights, on the CPU
    with pytest.raises(ImagefitError) as refused:
        zoo.summary_table(model, 100_000, 3)
    largest = int(re.search(r"the largest size that fits is (\d+)$", str(refused.value))[1])
    assert str(refused.value).startswith("--image-size 100000: one image through the model ")
    assert "Total params" in zoo.summary_table(model, largest, 3)  # 506 px: it runs
    with pytest.raises(ImagefitError):
        zoo.summary_table(model, largest + 1, 3)


def test_largest_that_fits_and_sizes_in_words():
    assert largest_that_fits(lambda value: value * value <= 1000, 4, 100) == 31
    assert largest_that_fits(lambda value: value < 4, 4, 100) is None
    assert largest_that_fits(lambda value: True, 4, 9) == 9
    assert [format_bytes(n) for n in (0, 999, 1000, 40 * GB, 1.2e12, 9.96e9)] == \
        ["0 bytes", "999 bytes", "1 kB", "40 GB", "1.2 TB", "10 GB"]


# -- the cache's own guard ------------------------------------------------------------------


def test_the_cache_refuses_what_its_disk_cannot_hold_before_writing(tiny_folder, monkeypatch):
    paths = sorted(str(p) for p in tiny_folder.rglob("*.png"))
    monkeypatch.setattr(cache_module, "free_disk", lambda folder: 1000)
    with pytest.raises(ImagefitError) as refused:
        build_cache(paths, CacheSettings(64, 1), progress=False)
    assert str(refused.value).startswith(
        f"the image cache of 8 images at 64 px would need 33 kB on {default_cache_root()} "
        "(free: 1 kB)")
    assert not default_cache_root().exists()


def test_a_build_that_fails_in_its_first_chunk_leaves_no_folder(tiny_folder, tmp_path):
    paths = sorted(str(p) for p in tiny_folder.rglob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths.append(str(tmp_path / "broken.png"))
    settings = CacheSettings(16, 1)
    with pytest.raises(ImagefitError, match="not a readable image"):
        build_cache(paths, settings, strict=True, progress=False)
    assert not (default_cache_root() / cache_key(paths, settings)).exists()


# -- text -----------------------------------------------------------------------------------


def names_with_two_long_rows(folder: Path) -> Path:
    """200 short names and two rows of 100,000 characters, all four in training."""
    rng = np.random.default_rng(0)
    names = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9)))
             for _ in range(200)]
    genders = ["female" if name[-1] in "aeiou" else "male" for name in names]
    split = ["valid" if i % 5 == 0 else "train" for i in range(200)]
    frame = pd.DataFrame({"name": names + ["x" * 100_000, "y" * 100_000],
                          "gender": genders + ["female", "male"],
                          "split": split + ["train", "train"]})
    path = folder / "names.csv"
    frame.to_csv(path, index=False)
    return path


def test_two_long_rows_do_not_set_the_text_length(tmp_path, capsys, one_thread):
    """The hostile CSV of issue 32 (its 99th percentile length was 39,006: 240 s an epoch):
    warned about, read at the short names' length, and an epoch is fast."""
    data = names_with_two_long_rows(tmp_path)
    code = main(["fit", str(data), "--task", "text", "--epochs", "1", "--no-report",
                 "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 0, err
    warned = [line for line in err.splitlines() if "--text-length: 2 of 162 training" in line]
    assert len(warned) == 1 and "give --text-length to read more" in warned[0]
    run_dir = next((tmp_path / "runs").iterdir())
    length = json.loads((run_dir / "model.json").read_text())["text"]["length"]
    assert length <= 8  # the names are 3-8 characters long
    epoch_time = pd.read_csv(run_dir / "metrics.csv")["time"].iloc[0]
    assert epoch_time < 5


def test_the_automatic_length_has_a_ceiling_and_ignores_a_few_outliers():
    names = ["ana", "jose", "maria"] * 40
    with pytest.warns(ImagefitWarning, match=r"2 of 122 training texts are over 10x"):
        assert automatic_text_length(names + ["x" * 5000, "y" * 9000]) == 5
    long_texts = ["z" * 600] * 10 + ["z" * 400] * 10
    with pytest.warns(ImagefitWarning, match=f"ceiling of {TEXT_LENGTH_CEILING}"):
        assert automatic_text_length(long_texts) == TEXT_LENGTH_CEILING
    assert automatic_text_length(["ab", "abcd", "abcdef"], 100) == 6  # no warning


def test_an_explicit_text_length_too_long_is_refused_with_one_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: GB)
    table = read_source(str(names_with_two_long_rows(tmp_path)),
                        FitConfig(task="text"))
    with pytest.raises(ImagefitError) as refused:
        preflight.check_text_room(table, 10_000_000, 8)
    message = str(refused.value)
    assert message.startswith("--text-length 10000000: ")
    largest = int(re.search(r"the largest length that fits is (\d+)", message).group(1))
    preflight.check_text_room(table, largest, 8)
    with pytest.raises(ImagefitError):
        preflight.check_text_room(table, largest + 1, 8)
