"""Built-in datasets: read from this machine first, downloaded only when nothing local exists."""

from __future__ import annotations

import gzip
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ImagefitError
from ..tasks import Task
from .table import Table, from_arrays

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DATASETS = Path("/usr/share/datasets")


def data_home() -> Path:
    """Where downloaded datasets are kept."""
    return Path(os.environ.get("IMAGEFIT_HOME", Path.home() / ".cache" / "imagefit")) / "datasets"


def read_digits() -> Table:
    """scikit-learn's 1,797 grey 8x8 digits (values 0..16, scaled to 0..255); no test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return from_arrays(images, digits.target, names=[str(i) for i in range(10)],
                       description="builtin:digits")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def _find_idx_folder(name: str, candidates: list[Path]) -> Path | None:
    first = FASHION_MNIST_FILES["train_images"]
    for folder in candidates:
        for base in (folder, folder / name):
            if (base / first).is_file() or (base / f"{first}.gz").is_file():
                return base
    return None


def _download_fashion_mnist(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES.values():
        final = target / f"{stem}.gz"
        if final.is_file():
            continue
        partial = final.with_suffix(".gz.part")
        with urllib.request.urlopen(f"{FASHION_MNIST_URL}{stem}.gz", timeout=20) as response:
            partial.write_bytes(response.read())
        partial.replace(final)


def read_fashion_mnist() -> Table:
    """Fashion-MNIST with its official 60k/10k train/test split.

    Looked for in $IMAGEFIT_DATA, /usr/share/datasets/fashion-mnist (Debian's
    dataset-fashion-mnist) and imagefit's data home; downloaded there when missing and the
    network allows (set IMAGEFIT_OFFLINE=1 to forbid it).
    """
    candidates = [Path(p) for p in [os.environ.get("IMAGEFIT_DATA")] if p]
    candidates += [SYSTEM_DATASETS / "fashion-mnist", data_home() / "fashion-mnist"]
    folder = _find_idx_folder("fashion-mnist", candidates)
    if folder is None:
        reason = "downloads are off (IMAGEFIT_OFFLINE)"
        if not os.environ.get("IMAGEFIT_OFFLINE"):
            try:
                _download_fashion_mnist(data_home() / "fashion-mnist")
                folder = data_home() / "fashion-mnist"
            except OSError as error:
                reason = f"the download failed: {getattr(error, 'reason', error)}"
        if folder is None:
            raise ImagefitError(
                f"builtin:fashion-mnist was not found and {reason}: install it with "
                "`apt-get install dataset-fashion-mnist` (Debian), or put the four idx files "
                "in a folder and name it in IMAGEFIT_DATA"
            )

    def load(key: str) -> np.ndarray:
        stem = FASHION_MNIST_FILES[key]
        path = folder / stem if (folder / stem).is_file() else folder / f"{stem}.gz"
        try:
            return _read_idx(path)
        except (OSError, ValueError, IndexError, EOFError) as error:
            raise ImagefitError(
                f"{path} is unreadable ({error}): delete it and fetch Fashion-MNIST again"
            ) from None

    images = np.concatenate([load("train_images"), load("test_images")])
    labels = np.concatenate([load("train_labels"), load("test_labels")]).astype(np.int64)
    split = ["train"] * 60000 + ["test"] * (len(labels) - 60000)
    return from_arrays(images, labels, names=FASHION_MNIST_CLASSES, split=split,
                       description="builtin:fashion-mnist")


NAME_MARKS = {"M": "male", "F": "female"}  # '?', '1M', '?F', '=' ... are unisex or unsure


def read_names() -> Table:
    """Given names and their gender, from the name list that the gender-guesser package
    ships (Jörg Michael's nam_dict.txt, GNU FDL): the names marked plain M or F, without
    the second spelling of names with umlauts and without names marked both ways; a '+'
    inside a name (a space or hyphen) becomes a space. No test split."""
    try:
        import gender_guesser
    except ImportError:
        raise ImagefitError("builtin:names reads the name list of the gender-guesser package: "
                            "pip install gender-guesser") from None
    path = Path(gender_guesser.__file__).parent / "data" / "nam_dict.txt"
    genders: dict[str, set[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            mark = line[:2].strip()
            if mark not in NAME_MARKS or (len(line) > 29 and line[29] == "+"):
                continue
            name = line[3:29].strip().replace("+", " ")
            if name:
                genders.setdefault(name, set()).add(NAME_MARKS[mark])
    names = sorted(name for name, marks in genders.items() if len(marks) == 1)
    classes = sorted(NAME_MARKS.values())
    targets = np.array([classes.index(next(iter(genders[n]))) for n in names], dtype=np.int64)
    return Table(task=Task("classification", classes), targets=targets,
                 split=np.full(len(names), "train", dtype=object), texts=names,
                 description="builtin:names")


BUILTINS: dict[str, Callable[[], Table]] = {
    "digits": read_digits,
    "fashion-mnist": read_fashion_mnist,
    "names": read_names,
}


def read_builtin(name: str) -> Table:
    if name not in BUILTINS:
        raise ImagefitError(
            f"unknown built-in dataset '{name}': choose one of "
            + ", ".join(f"builtin:{n}" for n in BUILTINS)
        )
    return BUILTINS[name]()
