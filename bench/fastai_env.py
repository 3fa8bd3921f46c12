"""fastai's side of the time-to-accuracy benchmark: its own virtual environment, and
Fashion-MNIST written as PNG folders (fastai's image cache, built before timing starts).

    from fastai_env import ensure_fastai_venv, export_png_folders
    python = ensure_fastai_venv()          # bench/results/tmp/venv-fastai/bin/python
    root = export_png_folders(Path(...))   # root/train/<class>/<i>.png, root/test/...
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

from PIL import Image

BENCH = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH / "results" / "tmp" / "venv-fastai"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
FASTAI_PIN = "fastai==2.8.12"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def ensure_fastai_venv(path: Path = DEFAULT_VENV, extra: tuple[str, ...] = ()) -> Path:
    """Create (once) a venv at `path` with pinned torch/torchvision and fastai (and the
    pinned `extra` packages, under the same constraints); return its python.

    torch and torchvision go in first, then fastai under a constraints file holding the same
    pins, so that fastai cannot pull another torch build. A stamp file naming the pins marks a
    finished install, which makes later calls instant. Raises RuntimeError on failure, with
    pip's output kept in `path`/install.log.
    """
    path = Path(path)
    python = path / "bin" / "python"
    stamp = path / ".fastai-installed"
    wanted = " ".join([*TORCH_PINS, FASTAI_PIN, *extra]) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted and python.exists():
        return python
    if not python.exists():
        _run(["python3", "-m", "venv", str(path)], path)
    constraints = path / "constraints.txt"
    constraints.write_text("\n".join(TORCH_PINS) + "\n")
    _run([str(python), "-m", "pip", "install", "--quiet", *TORCH_PINS], path)
    _run([str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints), FASTAI_PIN,
          *extra], path)
    stamp.write_text(wanted)
    return python


def _run(command: list[str], venv: Path) -> None:
    """Run an install step; on failure keep its output in `venv`/install.log and raise."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        log = venv / "install.log"
        venv.mkdir(parents=True, exist_ok=True)
        log.write_text(result.stdout + result.stderr)
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"fastai venv: `{' '.join(command[-3:])}` failed "
                           f"(exit {result.returncode}): {last} [see {log}]")


def _read_idx(path: Path) -> tuple[bytes, tuple[int, ...]]:
    """An idx(.gz) file's raw uint8 payload and its shape."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
        data = handle.read()
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    return data[4 + 4 * n_dims:], shape


def export_png_folders(out: Path, source: Path = FASHION_MNIST) -> Path:
    """Write Fashion-MNIST as `out`/{train,test}/<class>/<i>.png (60,000 + 10,000); return `out`.

    <i> is the image's index in its split's idx file; "T-shirt/top" becomes "T-shirt_top".
    Skipped when the stamp file of a finished export is there.
    """
    out = Path(out)
    stamp = out / ".export-complete"
    if stamp.is_file():
        return out
    names = [name.replace("/", "_") for name in CLASSES]
    counts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        pixels, (n, rows, cols) = _read_idx(_idx_file(source, f"{prefix}-images-idx3-ubyte"))
        labels, _ = _read_idx(_idx_file(source, f"{prefix}-labels-idx1-ubyte"))
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        size = rows * cols
        for i in range(n):
            image = Image.frombytes("L", (cols, rows), pixels[i * size: (i + 1) * size])
            image.save(out / split / names[labels[i]] / f"{i}.png")
        counts[split] = n
    stamp.write_text(f"{counts}\n")
    return out


def _idx_file(source: Path, stem: str) -> Path:
    """`source`/stem, gzipped or not."""
    for path in (source / f"{stem}.gz", source / stem):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{stem}(.gz) not found in {source}: "
                            "apt-get install dataset-fashion-mnist")
