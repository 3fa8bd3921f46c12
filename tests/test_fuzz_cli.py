"""A fuzz pass over the command line: malformed images, CSV files, option values and run files
thrown at ``imagefit``. For each: the exit status is 2 (or 0 where the input is usable), the
output holds no traceback, and no file is written outside a run directory (or the output
the command was asked for).

Each case runs ``imagefit.cli.main`` in this process, in a folder of its own; a few run the
installed command in a subprocess too, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import isolated
from imagefit.cli import main


def png(path: Path, kind: int = 0, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (size, size), dtype=np.uint8)
    if kind == 0:
        image[4:12, 4:12] = 230
    elif kind == 1:
        image[7:9, :] = 230
    else:
        image[:, 7:9] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def class_folder(root: Path, classes=("a", "b", "c"), per_class: int = 8) -> Path:
    for k, name in enumerate(classes):
        for i in range(per_class):
            png(root / name / f"{name}{i}.png", k, seed=10 * k + i)
    return root


def csv_file(root: Path, header: str, rows: list[str], name: str = "data.csv",
             images: int = 0) -> Path:
    for i in range(images):
        png(root / f"im{i}.png", i % 3, seed=i)
    path = root / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def labelled(root: Path, labels: list[str], header: str = "file,label",
             extra: Callable[[int], str] = lambda i: "") -> Path:
    rows = [f"im{i}.png,{label}{extra(i)}" for i, label in enumerate(labels)]
    return csv_file(root, header, rows, images=len(labels))


ABC = ["a", "b", "c"] * 4


@dataclass
class Case:
    """``make(folder) -> argv``; the statuses allowed; the paths (relative to the folder)
    the command may write besides run directories under runs/."""

    name: str
    make: Callable[[Path], list[str]]
    codes: tuple[int, ...] = (2,)
    writes: tuple[str, ...] = ()
    needs_run: bool = False
    words: tuple[str, ...] = field(default=())  # the message must name these


def fit(*options: str) -> Callable[[Path], list[str]]:
    """A fit of a small class folder with ``options``."""
    def make(folder: Path) -> list[str]:
        return ["fit", str(class_folder(folder / "data")), "--epochs", "1", "--no-progress",
                "--no-report", *options]
    return make


def fit_csv(labels: list[str], header: str = "file,label", extra=lambda i: "",
            *options: str) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        return ["fit", str(labelled(folder, labels, header, extra)), "--epochs", "1",
                "--no-progress", "--no-report", *options]
    return make


def fit_file(write: Callable[[Path], Path], *options: str) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        return ["fit", str(write(folder)), "--epochs", "1", "--no-progress", "--no-report",
                *options]
    return make


def a_file(path: Path) -> Path:
    path.write_text("x")
    return path


def a_folder(path: Path) -> Path:
    path.mkdir()
    return path


def a_cv_dir(folder: Path) -> Path:
    cv_dir = folder / "runs" / "old_cv"
    cv_dir.mkdir(parents=True)
    (cv_dir / "cv.json").write_text('{"runs": 3}')
    return cv_dir


def broken_images(folder: Path) -> Path:
    root = class_folder(folder / "data")
    (root / "a" / "a0.png").write_bytes(b"")  # empty
    (root / "b" / "b0.png").write_bytes((root / "b" / "b1.png").read_bytes()[:40])  # cut
    (root / "c" / "c0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))  # noise
    (root / "c" / "notes.txt").write_text("not an image")
    return root


def unreadable_class(folder: Path) -> Path:
    root = class_folder(folder / "data")
    for path in (root / "c").iterdir():
        path.write_bytes(b"junk")
    return root


def all_unreadable(folder: Path) -> Path:
    root = class_folder(folder / "data")
    for path in root.rglob("*.png"):
        path.write_bytes(b"junk")
    return root


def train_and_class_folders(folder: Path) -> Path:
    class_folder(folder / "data" / "train")
    class_folder(folder / "data" / "extra", classes=("a",))
    return folder / "data"


def empty_class(folder: Path) -> Path:
    root = class_folder(folder / "data")
    (root / "d").mkdir()
    return root


def odd_modes(folder: Path) -> Path:
    """Palette, 16-bit, RGBA, CMYK and a huge aspect ratio: all usable."""
    root = class_folder(folder / "data")
    Image.new("P", (20, 20)).save(root / "a" / "palette.png")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(root / "a" / "deep.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(root / "b" / "alpha.png")
    Image.new("CMYK", (20, 20)).save(root / "b" / "cmyk.jpg")
    Image.new("L", (400, 3)).save(root / "c" / "strip.png")
    return root


def raw_csv(text: bytes | str, name: str = "data.csv", images: int = 3):
    def write(folder: Path) -> Path:
        for i in range(images):
            png(folder / f"im{i}.png", i % 3, seed=i)
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path
    return write


def space_file(folder: Path, text: str) -> Path:
    (folder / "space.yaml").write_text(text)
    return folder / "space.yaml"


def yaml_config(text: str):
    def make(folder: Path) -> list[str]:
        (folder / "fit.yaml").write_text(text)
        return ["fit", str(class_folder(folder / "data")), "--config", str(folder / "fit.yaml"),
                "--no-progress"]
    return make


def pickled_weights(folder: Path) -> list[str]:
    class_folder(folder / "data")
    torch.save({"state": object.__new__(Payload)}, folder / "weights.pt")
    return ["fit", str(folder / "data"), "--model", "resnet18", "--pretrained",
            str(folder / "weights.pt"), "--epochs", "1"]


class Payload:
    """Stands for code hidden in a weights file."""


def with_run(edit: Callable[[Path], None], *command: str) -> Callable[[Path], list[str]]:
    """A copy of the trained run, edited, then ``command`` with RUN and IMAGE filled in."""
    def make(folder: Path) -> list[str]:
        run = folder / "runs" / "run"
        shutil.copytree(TRAINED[0], run)
        edit(run)
        image = png(folder / "image.png")
        return [part.replace("RUN", str(run)).replace("IMAGE", str(image)) for part in command]
    return make


def nothing(run: Path) -> None:
    pass


def cut_weights(run: Path) -> None:
    (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:64])


def edit_info(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        info = json.loads((run / "model.json").read_text())
        change(info)
        (run / "model.json").write_text(json.dumps(info))
    return edit


def write_to(name: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        target = run / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if isinstance(data, bytes) else data.encode())
    return edit


def pickled_checkpoint(run: Path) -> None:
    torch.save({"model": Payload()}, run / "checkpoints" / "last.pt")


CASES = [
    # -- data sources and images ----------------------------------------------------------
    Case("missing data", lambda f: ["fit", str(f / "nowhere")], words=("not found",)),
    Case("empty folder", lambda f: ["fit", str(a_folder(f / "e"))],
         words=("empty",)),
    Case("images without class folders",
         lambda f: ["fit", str(png(f / "flat" / "x.png").parent)], words=("class",)),
    Case("one class", fit_file(lambda f: class_folder(f / "data", classes=("a",))),
         words=("at least two classes",)),
    Case("empty class folder", fit_file(empty_class), words=("holds no images",)),
    Case("class all unreadable", fit_file(unreadable_class), words=("class 'c'",)),
    Case("every image unreadable", fit_file(all_unreadable), words=("readable image",)),
    Case("train/ beside class folders", fit_file(train_and_class_folders),
         words=("would be ignored",)),
    Case("some broken images are skipped", fit_file(broken_images), codes=(0,)),
    Case("broken image with --strict", fit_file(broken_images, "--strict"),
         words=("--strict",)),
    Case("odd image modes", fit_file(odd_modes), codes=(0,)),
    Case("empty CSV", fit_file(raw_csv(b"")), words=("data.csv",)),
    Case("CSV header only", fit_file(raw_csv("file,label\n")), words=("no rows",)),
    Case("CSV of paths only", fit_file(raw_csv("file\nim0.png\nim1.png\n")),
         words=("label column",)),
    Case("CSV of missing images", fit_file(raw_csv("file,label\nnope.png,a\nim1.png,b\n")),
         words=("do not exist",)),
    Case("binary garbage CSV", fit_file(raw_csv(os.urandom(300))), words=("data.csv",)),
    Case("CSV in latin-1", fit_file(raw_csv("file,label\nim0.png,caf\xe9\nim1.png,b\n"
                                            .encode("latin-1"))), codes=(0, 2)),
    Case("bad split value", fit_csv(ABC, "file,label,split", lambda i: ",later"),
         words=("split 'later'",)),
    Case("all rows test", fit_csv(ABC, "file,label,split", lambda i: ",test"),
         words=("no training rows",)),
    Case("class only in valid", fit_csv(ABC, "file,label,split",
                                        lambda i: ",valid" if i % 3 == 2 else ",train"),
         words=("class 'c'",)),
    Case("one file two labels", fit_file(raw_csv("file,label\nim0.png,a\nim1.png,b\n"
                                                 "im2.png,a\nim1.png,a\n")),
         words=("different labels",)),
    Case("target not a number", fit_csv(["1.5", "abc", "2.5"] * 4, "file,y", lambda i: "",
                                        "--task", "regression"), words=("line", "'abc'")),
    Case("target NaN", fit_csv(["1.5", "nan", "2.5"] * 4, "file,y"), words=("finite",)),
    Case("target beyond float32", fit_csv(["1.5", "1e39", "2.5"] * 4, "file,y"),
         words=("32-bit",)),
    Case("constant regression target", fit_csv(["2.5"] * 12, "file,y"),
         words=("nothing to learn",)),
    Case("constant integer target", fit_csv(["7"] * 12, "file,y"),
         words=("nothing to learn",)),
    Case("semicolon CSV", fit_file(raw_csv("file;label\n" + "".join(
        f"im{i}.png;{'abc'[i % 3]}\n" for i in range(12)), images=12)), codes=(0,)),
    Case("tab CSV", fit_file(raw_csv("file\tlabel\n" + "".join(
        f"im{i}.png\t{'abc'[i % 3]}\n" for i in range(12)), images=12)), codes=(0,)),
    Case("one-hot row with two ones", fit_csv(["1,0", "1,1", "0,1"] * 4, "file,x,y",
                                              lambda i: "", "--task", "classification"),
         words=("exactly one 1",)),
    Case("missing --label-col", fit_csv(ABC, "file,label", lambda i: "", "--label-col",
                                        "nope"), words=("--label-col",)),
    Case("missing --path-col", fit_csv(ABC, "file,label", lambda i: "", "--path-col", "p"),
         words=("--path-col",)),
    # -- option values --------------------------------------------------------------------
    Case("negative lr", fit("--lr", "-1"), words=("--lr",)),
    Case("text lr", fit("--lr", "abc"), words=("--lr",)),
    Case("NaN lr", fit("--lr", "nan"), words=("--lr",)),
    Case("zero epochs", fit("--epochs", "0"), words=("--epochs",)),
    Case("fractional epochs", fit("--epochs", "1.5"), words=("--epochs",)),
    Case("zero batch", fit("--bs", "0"), words=("--bs",)),
    Case("valid-pct 1", fit("--valid-pct", "1"), words=("--valid-pct",)),
    Case("tiny image size", fit("--image-size", "2"), words=("--image-size",)),
    Case("unknown augment preset", fit("--augment", "bogus"), words=("--augment",)),
    Case("augment options not JSON", fit("--augment-options", "{bad"),
         words=("--augment-options",)),
    Case("augment option out of range", fit("--augment-options", '{"rotate": 999}'),
         words=("rotate",)),
    Case("unknown metric", fit("--metrics", "nonsense"), words=("--metrics",)),
    Case("unknown monitor", fit("--monitor", "nope", "--early-stop", "2"),
         words=("--monitor",)),
    Case("too many devices", fit("--devices", "999"), words=("--devices 999",)),
    Case("no CUDA here", fit("--device", "cuda"), words=("--device",)),
    Case("unknown model", fit("--model", "resnet81"), words=("resnet18",)),
    Case("budget not a duration", lambda f: ["fit", str(class_folder(f / "data")), "--budget",
                                             "soon"], words=("--budget",)),
    Case("zero budget", lambda f: ["fit", str(class_folder(f / "data")), "--budget", "0"],
         words=("--budget",)),
    Case("budget with epochs", fit("--budget", "1m"), words=("--budget",)),
    Case("missing config file", fit("--config", "nope.yaml"), words=("nope.yaml",)),
    Case("config not YAML", yaml_config("epochs: [1,\n"), words=("fit.yaml",)),
    Case("config a list", yaml_config("- 1\n"), words=("mapping",)),
    Case("config unknown key", yaml_config("epochz: 3\n"), words=("--epochz",)),
    Case("runs-dir is a file", lambda f: fit("--runs-dir", str(a_file(f / "runs_file")))(f),
         words=("is a file",)),
    Case("oversample without factor", fit("--oversample", "a"), words=("--oversample",)),
    Case("lr-groups of the wrong length", fit("--lr-groups", "1e-3,2e-3"),
         words=("--lr-groups",)),
    Case("pretrained file missing", fit("--model", "resnet18", "--pretrained", "nope.pt"),
         words=("nope.pt",)),
    Case("pretrained file with pickled code", pickled_weights, words=("never loaded",)),
    Case("soft labels missing", fit("--soft-labels", "nope_cv"), words=("nope_cv",)),
    Case("diverging fit", fit("--lr", "1e9", "--epochs", "2"), words=("diverged",)),
    # -- run directories and the other commands -------------------------------------------
    Case("predict with a folder that is no run", lambda f: ["predict", str(f), str(f)],
         words=("holds no model",)),
    Case("predict with cut weights", with_run(cut_weights, "predict", "RUN", "IMAGE"),
         needs_run=True, words=("damaged",)),
    Case("predict with empty model.json", with_run(write_to("model.json", ""), "predict",
                                                    "RUN", "IMAGE"),
         needs_run=True, words=("model.json",)),
    Case("predict with model.json of another task",
         with_run(edit_info(lambda i: i["task"].update(kind="poetry")), "predict", "RUN",
                  "IMAGE"), needs_run=True, words=("model.json",)),
    Case("predict with model.json of other classes",
         with_run(edit_info(lambda i: i["task"].update(names=["x", "y"])), "predict", "RUN",
                  "IMAGE"), needs_run=True, words=("model.json",)),
    Case("predict --out a folder", with_run(write_to("out/keep", ""), "predict", "RUN",
                                            "IMAGE", "--out", "RUN/out"),
         needs_run=True, words=("is a folder",)),
    Case("predict a missing input", with_run(nothing, "predict", "RUN", "nowhere.png"),
         needs_run=True, words=("not found",)),
    Case("predict writes its CSV", with_run(nothing, "predict", "RUN", "IMAGE", "--out",
                                            "preds.csv"),
         codes=(0,), needs_run=True, writes=("preds.csv",)),
    Case("evaluate on data of other classes",
         lambda f: with_run(nothing, "evaluate", "RUN", str(class_folder(
             f / "other", classes=("p", "q"))))(f), needs_run=True, words=("classes",)),
    Case("resume a folder that is no run", lambda f: ["fit", "--resume", str(f)],
         words=("no training checkpoint",)),
    Case("resume a garbage checkpoint", with_run(write_to("checkpoints/last.pt", b"xx"), "fit",
                                                 "--resume", "RUN"),
         needs_run=True, words=("cannot be resumed",)),
    Case("resume a pickled checkpoint", with_run(pickled_checkpoint, "fit", "--resume", "RUN"),
         needs_run=True, words=("never unpickled",)),
    Case("resume a damaged config", with_run(write_to("config.yaml", "data: [x"), "fit",
                                             "--resume", "RUN"),
         needs_run=True, words=("config.yaml",)),
    Case("resume with data", lambda f: ["fit", "builtin:digits", "--resume", str(f)],
         words=("leave out DATA",)),
    Case("report of a folder that is no run", lambda f: ["report", str(f)],
         codes=(2,)),
    Case("runs of a file", lambda f: ["runs", str(a_file(f / "x"))],
         words=("not a folder",)),
    Case("compare a missing run", lambda f: ["runs", "--compare", str(f / "nope")],
         words=("not found",)),
    Case("explain --out a file", with_run(write_to("../taken", "x"), "explain", "RUN",
                                          "IMAGE", "--out", "RUN/../taken"),
         needs_run=True, words=("is a file",)),
    Case("report with damaged interpretation files",
         with_run(write_to("interpretation.safetensors", b"xx"), "report", "RUN"), codes=(0,),
         needs_run=True),
    Case("predict with a damaged cv.json", lambda f: ["predict", str(a_cv_dir(f)),
                                                      str(png(f / "x.png"))],
         words=("cv.json is damaged",)),
    Case("unknown command", lambda f: ["trian", "x"]),
    Case("unknown cache action", lambda f: ["cache", "burn"]),
    # -- options given where nothing would read them (issue 32) ---------------------------
    *[Case(f"{' '.join(options)} alone", fit(*options),
           words=(options[-1] if options[-1].startswith("--") else options[-2],))
      for options in [
        ("--cycle-len", "2"), ("--cycle-mult", "3"), ("--sgdr-cycles", "2"), ("--snapshots",),
        ("--recipe-max-cycles", "2"), ("--monitor", "valid_loss"), ("--monitor-mode", "max"),
        ("--min-delta", "0.1"), ("--plateau-factor", "0.5"), ("--plc-warmup", "0.5"),
        ("--plc-theta-start", "0.2"), ("--plc-theta-end", "0.2"), ("--plc-schedule", "step"),
        ("--soft-alpha", "0.2"), ("--no-train-bn",), ("--no-tta", "--tta-n", "8"),
        ("--no-tta", "--tta-augment", "light"), ("--tta-augment", "flip", "--tta-n", "8"),
        ("--lr-groups", "1e-3,1e-2", "--lr-low", "1e-4"),
        ("--schedule", "flat_cos", "--pct-start", "0.4")]],
    *[Case(f"{option} with a class folder", fit(option, value), words=(option, "not a CSV"))
      for option, value in [("--label-col", "y"), ("--path-col", "p"), ("--split-col", "s"),
                            ("--label-delim", ";"), ("--folder", "x"), ("--suffix", ".png")]],
    *[Case(f"{option} with images", fit(*filter(None, (option, value))),
           words=(option, "not texts"))
      for option, value in [("--text-length", "8"), ("--text-percentile", "90"),
                            ("--keep-case", None)]],
    Case("resume with --lr", with_run(nothing, "fit", "--resume", "RUN", "--lr", "1"),
         needs_run=True, words=("--lr: a resumed fit",)),
    Case("resume with --no-report and --epochs",
         with_run(nothing, "fit", "--resume", "RUN", "--no-report", "--epochs", "9"),
         needs_run=True, words=("--epochs", "--no-report")),
    Case("resume with --config", with_run(nothing, "fit", "--resume", "RUN", "--config",
                                          "x.yaml"), needs_run=True, words=("--config",)),
    # -- options that scale memory or time -------------------------------------------------
    Case("image size of a satellite", fit("--image-size", "100000"),
         words=("--image-size 100000", "largest")),
    Case("progressive sizes too large", fit("--image-sizes", "16,100000"),
         words=("--image-sizes",)),
    Case("text length of a hundred million", fit_file(raw_csv(
        "name,label\n" + "".join(f"name{i},{'ab'[i % 2]}\n" for i in range(40)), images=0),
        "--task", "text", "--text-length", "100000000"), words=("--text-length 100000000",)),
    Case("show-batch at a huge size", lambda f: ["show-batch", str(class_folder(f / "data")),
                                                 "--image-size", "100000", "--out",
                                                 str(f / "b.png")], words=("--image-size",)),
    Case("lr-find at a huge size", lambda f: ["lr-find", str(class_folder(f / "data")),
                                              "--image-size", "100000", "--out",
                                              str(f / "lr.png"), "--no-progress"],
         words=("--image-size",)),
    Case("summary at a huge size", lambda f: ["summary", "resnet18", "--image-size", "100000"],
         words=("--image-size",)),
    # -- several machines ------------------------------------------------------------------
    Case("nodes without a master", fit("--nnodes", "2"), words=("--master",)),
    Case("master that does not resolve", fit("--nnodes", "2", "--node-rank", "1", "--master",
                                             "nohost.invalid:29500"),
         words=("nohost.invalid",)),
    Case("master without a port", fit("--nnodes", "2", "--master", "127.0.0.1"),
         words=("--master",)),
    Case("node rank beyond the nodes", fit("--nnodes", "2", "--node-rank", "5", "--master",
                                           "127.0.0.1:29500"), words=("--node-rank",)),
    Case("join timeout zero", fit("--nnodes", "2", "--master", "127.0.0.1:29500",
                                  "--join-timeout", "0"), words=("--join-timeout",)),
    Case("join timeout for one node", fit("--join-timeout", "30"), words=("--join-timeout",)),
    # -- the other commands ----------------------------------------------------------------
    Case("lr-find with --lr", lambda f: ["lr-find", str(class_folder(f / "data")), "--lr", "1",
                                         "--out", str(f / "lr.png")], words=("--lr",)),
    Case("lr-find of missing data", lambda f: ["lr-find", str(f / "nowhere")],
         words=("not found",)),
    Case("lr-find --out a folder", lambda f: ["lr-find", str(class_folder(f / "data")),
                                              "--out", str(a_folder(f / "out"))],
         words=("--out",)),
    Case("show-batch of no images", lambda f: ["show-batch", str(class_folder(f / "data")),
                                               "--n-images", "0", "--out", str(f / "b.png")],
         words=("--n-images",)),
    Case("show-batch of a CSV of texts", lambda f: ["show-batch", str(raw_csv(
        "name,label\nanna,f\nbob,m\ncarl,m\ndora,f\n", images=0)(f)), "--out",
        str(f / "b.png")], words=("texts",)),
    Case("check of missing data", lambda f: ["check", str(f / "nowhere")],
         words=("not found",)),
    Case("check with one overfit step", lambda f: ["check", str(class_folder(f / "data")),
                                                   "--overfit-steps", "1"],
         words=("--overfit-steps",)),
    Case("check with a negative hash distance", lambda f: ["check", str(class_folder(
        f / "data")), "--near-hamming", "-1"], words=("--near-hamming",)),
    Case("cv of one fold", lambda f: ["cv", str(class_folder(f / "data")), "--folds", "1"],
         words=("--folds",)),
    Case("cv of more folds than images", lambda f: ["cv", str(class_folder(f / "data")),
                                                    "--folds", "40", "--epochs", "1"],
         words=("fold",)),
    Case("cv grouped without groups", lambda f: ["cv", str(class_folder(f / "data")),
                                                 "--fold-method", "group"], words=("group",)),
    Case("cv --group-col of a folder", lambda f: ["cv", str(class_folder(f / "data")),
                                                  "--group-col", "patient"],
         words=("--group-col",)),
    Case("cv with a missing folds file", lambda f: ["cv", str(class_folder(f / "data")),
                                                    "--folds-file", "nope.csv"],
         words=("nope.csv",)),
    Case("sweep of an unknown model", lambda f: ["sweep", str(class_folder(f / "data")),
                                                 "--models", "nonsense"],
         words=("nonsense",)),
    Case("sweep of width zero", lambda f: ["sweep", str(class_folder(f / "data")),
                                           "--widths", "0"], words=("--widths",)),
    Case("sweep of widths in words", lambda f: ["sweep", str(class_folder(f / "data")),
                                                "--widths", "wide"], words=("--widths",)),
    Case("tune of a garbled space", lambda f: ["tune", str(class_folder(f / "data")),
                                               "--space", str(space_file(f, "lr: [0.1,\n"))],
         words=("space.yaml", "YAML")),
    Case("tune of an unknown option", lambda f: ["tune", str(class_folder(f / "data")),
                                                 "--space", str(space_file(
                                                     f, "lrr: {type: float, low: 0, high: 1}\n"
                                                 ))], words=("lrr", "did you mean lr")),
    Case("tune of unknown models", lambda f: ["tune", str(class_folder(f / "data")),
                                              "--space", str(space_file(
                                                  f, "model: [small_cnn, resnet81]\n"))],
         words=("resnet81", "did you mean resnet18")),
    Case("tune of a space that is no file", lambda f: ["tune", str(class_folder(f / "data")),
                                                       "--space", "lr=?"],
         words=("--space",)),
    Case("tune of no trials", lambda f: ["tune", str(class_folder(f / "data")),
                                         "--n-trials", "0"], words=("--n-trials",)),
    Case("tune of zero workers", lambda f: ["tune", str(class_folder(f / "data")),
                                            "--workers", "0"], words=("--workers",)),
    Case("tune with an unknown pruner", lambda f: ["tune", str(class_folder(f / "data")),
                                                   "--pruner", "axe"], words=("--pruner",)),
    Case("tune with a storage of no kind", lambda f: ["tune", str(class_folder(f / "data")),
                                                      "--storage", "nothing://x"],
         words=("--storage",)),
    Case("tune with a timeout in words", lambda f: ["tune", str(class_folder(f / "data")),
                                                    "--timeout", "soon"],
         words=("--timeout",)),
    Case("label-issues of a folder that is no CV", lambda f: ["label-issues", str(a_folder(
        f / "nocv"))], words=("nocv",)),
    Case("label-issues of a CV directory without predictions",
         lambda f: ["label-issues", str(a_cv_dir(f))], words=("not a CV directory",)),
    Case("label-issues with an unknown method", lambda f: ["label-issues", str(a_cv_dir(f)),
                                                           "--method", "guess"],
         words=("--method",)),
    Case("export of a folder that is no run", lambda f: ["export", str(a_folder(f / "norun"))],
         words=("norun",)),
    Case("export with an ancient opset", with_run(nothing, "export", "RUN", "--opset", "3"),
         needs_run=True, words=("--opset",)),
    Case("export --out a folder", with_run(nothing, "export", "RUN", "--out", "RUN"),
         needs_run=True, words=("--out",)),
    Case("export with cut weights", with_run(cut_weights, "export", "RUN"), needs_run=True,
         words=("damaged",)),
    Case("serve a missing run", lambda f: ["serve", str(f / "nowhere")], words=("nowhere",)),
    Case("serve on port 70000", with_run(nothing, "serve", "RUN", "--port", "70000"),
         needs_run=True, words=("--port",)),
    Case("serve beyond PIL's pixel limit", with_run(nothing, "serve", "RUN", "--max-pixels",
                                                    "1000000000"), needs_run=True,
         words=("--max-pixels",)),
    Case("serve with no idle time", with_run(nothing, "serve", "RUN", "--idle-timeout", "0"),
         needs_run=True, words=("--idle-timeout",)),
    Case("serve with cut weights", with_run(cut_weights, "serve", "RUN", "--port", "0"),
         needs_run=True, words=("damaged",)),
    Case("predict --tta-n without --tta", with_run(nothing, "predict", "RUN", "IMAGE",
                                                   "--tta-n", "8"),
         needs_run=True, words=("--tta-n",)),
    Case("predict --path-col of an image", with_run(nothing, "predict", "RUN", "IMAGE",
                                                    "--path-col", "p"),
         needs_run=True, words=("--path-col", "no INPUT is a CSV")),
    Case("predict --id-col of a table", with_run(nothing, "predict", "RUN", "IMAGE",
                                                 "--id-col", "name"),
         needs_run=True, words=("--id-col",)),
    Case("predict --text with an image model", with_run(nothing, "predict", "RUN", "--text",
                                                        "anna"), needs_run=True,
         words=("image",)),
    Case("predict a batch of zero", with_run(nothing, "predict", "RUN", "IMAGE", "--bs", "0"),
         needs_run=True, words=("--bs",)),
    Case("evaluate an unknown split", with_run(nothing, "evaluate", "RUN", "builtin:digits",
                                               "--split", "later"),
         needs_run=True, words=("--split",)),
    Case("evaluate --tta-augment without --tta",
         with_run(nothing, "evaluate", "RUN", "builtin:digits", "--tta-augment", "light"),
         needs_run=True, words=("--tta-augment",)),
    Case("evaluate missing data", with_run(nothing, "evaluate", "RUN", "nowhere"),
         needs_run=True, words=("not found",)),
    Case("explain with an unknown method", with_run(nothing, "explain", "RUN", "IMAGE",
                                                    "--method", "xray"),
         needs_run=True, words=("--method",)),
    Case("explain with no opacity", with_run(nothing, "explain", "RUN", "IMAGE", "--alpha",
                                             "0"), needs_run=True, words=("--alpha",)),
    Case("explain a layer that is not there", with_run(nothing, "explain", "RUN", "IMAGE",
                                                       "--layer", "nolayer", "--out",
                                                       "RUN/explained"),
         needs_run=True, words=("nolayer",)),
    Case("explain a class that is not there", with_run(nothing, "explain", "RUN", "IMAGE",
                                                       "--target", "zebra", "--out",
                                                       "RUN/explained"),
         needs_run=True, words=("zebra",)),
    Case("summary of an unknown model", lambda f: ["summary", "resnet81"], words=("resnet81",)),
    Case("summary of a folder that is no run", lambda f: ["summary", str(a_folder(f / "x"))],
         words=("x",)),
    Case("models at image size zero", lambda f: ["models", "--image-size", "0"],
         words=("--image-size",)),
    Case("report of a run with damaged metrics",
         with_run(write_to("metrics.json", '{"epochs": "many"'), "report", "RUN"),
         codes=(0,), needs_run=True),  # a warning: the report leaves out what it held
    Case("runs with a damaged metrics.json",
         with_run(write_to("metrics.json", '{"epochs": "many"}'), "runs", "RUN/.."),
         codes=(0,), needs_run=True),
]

TRAINED: list[Path] = []


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_run")
    with isolated(root):
        code = main(["fit", "builtin:digits", "--epochs", "1", "--runs-dir",
                     str(root / "runs"), "--no-progress", "--no-report"])
    assert code == 0
    TRAINED[:] = [next((root / "runs").iterdir())]
    return TRAINED[0]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_there_are_at_least_150_cases():
    assert len(CASES) >= 150


def children() -> set[int]:
    """Live processes whose parent is this one."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[1] == str(os.getpid()) and stat[0] != "Z":
            found.add(int(entry.name))
    return found


COMMANDS_RUN: dict[str, str] = {}  # case name -> command, as the cases run


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_malformed_input_gets_one_clear_line(case, tmp_path, monkeypatch, capsys, request):
    if case.needs_run:
        request.getfixturevalue("trained_run")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = case.make(work)
    if argv[0] in ("fit", "cv") and "--resume" not in argv and "--runs-dir" not in argv:
        argv += ["--runs-dir", str(work / "runs")]
    before = files_under(work)
    runs_before = set(os.listdir(work / "runs")) if (work / "runs").is_dir() else set()
    processes_before = children()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    out, err = capsys.readouterr()
    COMMANDS_RUN[case.name] = argv[0]
    assert children() - processes_before == set(), "a process outlived the command"
    assert code in case.codes, f"{argv}: exit {code}\n{out}\n{err}"
    assert "Traceback" not in out + err
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("imagefit: error:")
                  or line.startswith("usage:") or "error:" in line]
        assert errors, err
        assert all(word in err for word in case.words), err
    written = files_under(work) - before
    runs_dir = work / "runs"
    outside = [p for p in written if not p.startswith("runs" + os.sep) and p not in case.writes]
    assert outside == [], f"written outside a run directory: {outside}"
    if code == 2 and case.name != "diverging fit" and runs_dir.is_dir():
        made = set(os.listdir(runs_dir)) - runs_before
        assert made == set(), f"a failed command left {made}"


def test_the_cases_cover_every_command():
    from imagefit.cli import build_parser

    if len(COMMANDS_RUN) < len(CASES):
        pytest.skip("runs after the cases, when they all ran")  # pragma: no cover
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert commands - set(COMMANDS_RUN.values()) == set()


SUBPROCESS_CASES = ["negative lr", "one class", "class all unreadable", "predict with cut "
                    "weights", "resume a pickled checkpoint", "unknown command"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_the_installed_command_prints_no_traceback(name, tmp_path, trained_run):
    case = next(c for c in CASES if c.name == name)
    work = tmp_path / "work"
    work.mkdir()
    argv = case.make(work)
    done = subprocess.run([sys.executable, "-m", "imagefit", *argv], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in case.codes, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(("imagefit: error:", "usage:",
                                                            "imagefit: "))
