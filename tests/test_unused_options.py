"""No option is silently ignored: each option of each command, given a value other than its
default, either acts or is refused in one line.

"Acts" is measured as "is read": the options objects record which of their fields the
command's code reads (reads by the option checks themselves do not count). A command runs
once with its defaults on small data; every option that run did not read is then given
alone, with a value other than its default, and must be refused (exit 2, naming the flag,
saying why it cannot act) or be read. Reading is what acting needs, not all it needs: the
effect of each option is tested against a control in test_option_effects.py and beside
each feature."""

from __future__ import annotations

import shutil
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagefit
import imagefit.config as config
from conftest import isolated
from imagefit.cli import main
from imagefit.errors import ImagefitError

# Reads by the option checks (config.py, sources.refuse_unused) are not the command acting.
CHECKERS = ("refuse_unused",)


class Reads:
    """The fields of options objects that code outside the checks reads."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __enter__(self) -> Reads:
        original = config.Options.__getattribute__
        names = self.names

        def read(options, name):
            if name in type(options).model_fields:
                caller = sys._getframe(1).f_code
                if not (caller.co_filename.endswith("config.py")
                        or caller.co_name in CHECKERS):
                    names.add(name)
            return original(options, name)

        self.original = original
        config.Options.__getattribute__ = read
        return self

    def __exit__(self, *exc) -> None:
        config.Options.__getattribute__ = self.original


NO_OTHER = "no other value"  # a choice of one (export --format onnx): nothing to ignore


def other_value(model: type[config.Options], name: str):
    """A valid value of ``name`` other than its default, as the command line gives it."""
    if (model.__name__, name) in VALUES:
        return VALUES[model.__name__, name]
    if name in VALUES:
        return VALUES[name]
    field = model.model_fields[name]
    default, annotation = field.default, field.annotation
    if annotation is bool:
        return None  # the flag alone, or --no-FLAG: see argv_for
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return next((str(choice) for choice in typing.get_args(arg) if choice != default),
                        NO_OTHER)
    kinds = typing.get_args(annotation) or (annotation,)
    if int in kinds and (default is None or isinstance(default, int)):
        return str((default or 1) + 1)
    if float in kinds:
        return str(default / 2 if default else 0.5)
    raise AssertionError(f"give tests/test_unused_options.py VALUES a value for "
                         f"{model.__name__}.{name}")


def argv_for(model: type[config.Options], name: str) -> list[str]:
    flag = "--" + name.replace("_", "-")
    field = model.model_fields[name]
    if field.annotation is bool:
        return [config.option_flag(name, not field.default)]
    return [flag, other_value(model, name)]


# Values the types alone do not give (a name, a file, a column).
VALUES = {
    "path_col": "p", "label_col": "y", "text_col": "t", "label_delim": ";", "folder": "x",
    "suffix": ".png", "split_col": "s", "monitor": "valid_loss", "cache_dir": "cache2",
    "target": "a", "layer": "features", "budget": "30s", "name": "named",
    "soft_labels": "nowhere_cv", "drop_rows": "issues.csv", "relabel": "issues.csv",
    "lr_groups": "1e-3,2e-3", "image_sizes": "12,16", "oversample": "a=2",
    "class_weights": "1,2,3", "metrics": "f1_macro", "log": "tensorboard",
    "pretrained": "weights.safetensors", "augment_options": '{"rotate": 5}',
    "head_hidden": "32", "id_col": "name", "device": "cpu", "text_length": "5",
    "sgdr_cycles": "2", "runs_dir": "runs2", "group_col": "g", "folds_file": "folds.csv",
    "models": "small_cnn,resnet18", "widths": "8,16", "host": "localhost",
    ("ServeOptions", "port"): "0", "space": "lr=1e-3:1e-1:log", "timeout": "10m",
    "study": "named_study", "storage": "sqlite:///tune.db", "opt": "sgd", "model": "resnet18",
}


def class_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate("abc"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            image = rng.integers(0, 60, (16, 16), dtype=np.uint8)
            image[4 * k:4 * k + 6, 4:12] = 230
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unused_options")
    class_folder(root / "data")
    with isolated(root):
        assert main(["fit", str(root / "data"), "--epochs", "1", "--no-progress",
                     "--no-report", "--runs-dir", str(root / "runs")]) == 0
    (root / "runs").iterdir().__next__().rename(root / "run")
    return root


# command -> (options model, argv before the options, given the work folder)
COMMANDS = {
    "fit": (config.FitConfig, lambda w: ["fit", str(w / "data"), "--epochs", "1",
                                        "--no-progress", "--no-report", "--runs-dir",
                                        str(w / "runs")]),
    "predict": (config.PredictOptions, lambda w: ["predict", str(w / "run"),
                                                  str(w / "data" / "a" / "0.png"),
                                                  "--no-progress"]),
    "evaluate": (config.EvaluateOptions, lambda w: ["evaluate", str(w / "run"),
                                                    str(w / "data")]),
    "explain": (config.ExplainOptions, lambda w: ["explain", str(w / "run"),
                                                  str(w / "data" / "a" / "0.png"), "--out",
                                                  str(w / "explained"), "--no-progress"]),
    "export": (config.ExportOptions, lambda w: ["export", str(w / "run"), "--out",
                                                str(w / "model.onnx"), "--no-progress"]),
    "lr-find": (config.FitConfig, lambda w: ["lr-find", str(w / "data"), "--out",
                                             str(w / "lr.png"), "--no-progress"]),
    "show-batch": (config.ShowBatchOptions, lambda w: ["show-batch", str(w / "data"), "--out",
                                                       str(w / "batch.png")]),
}

# Commands whose options are fit's and their own: fit's are tested with fit (cv, check, sweep
# and tune hand them to their fits), their own here.
OWN = {
    "cv": (config.CVConfig, lambda w: ["cv", str(w / "data"), "--folds", "2", "--epochs", "1",
                                      "--no-progress", "--no-report", "--runs-dir",
                                      str(w / "runs")]),
    "check": (config.CheckConfig, lambda w: ["check", str(w / "data"), "--no-progress",
                                             "--runs-dir", str(w / "runs"),
                                             "--overfit-steps", "10", "--sanity-steps", "10"]),
    "sweep": (config.SweepConfig, lambda w: ["sweep", str(w / "data"), "--models",
                                             "small_cnn", "--epochs", "1", "--no-progress",
                                             "--runs-dir", str(w / "runs")]),
    "tune": (config.TuneConfig, lambda w: ["tune", str(w / "data"), "--n-trials", "2",
                                           "--epochs", "1", "--confirm", "0", "--no-progress",
                                           "--runs-dir", str(w / "runs")]),
    "label-issues": (config.LabelIssuesOptions, lambda w: ["label-issues", str(w / "cv_run"),
                                                           "--no-progress"]),
    "serve": (config.ServeOptions, lambda w: ["serve", str(w / "run"), "--port", "0"]),
}

REFUSALS = ("acts only", "nothing would read", "acts ", "does not take")


def run(argv: list[str], work: Path, capsys) -> tuple[int, set[str], str]:
    for made in ("explained", "model.onnx", "model.onnx.json", "lr.png", "batch.png"):
        target = work / made
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    capsys.readouterr()
    with isolated(work), Reads() as reads:
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    return code, reads.names, capsys.readouterr().err


@pytest.fixture
def no_server(monkeypatch):
    """``serve`` builds its app and server from the options, then returns at once."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)


@pytest.mark.parametrize("command", [*COMMANDS, *OWN])
def test_every_option_given_acts_or_is_refused(command, work, capsys, monkeypatch, request):
    model, make = COMMANDS.get(command) or OWN[command]
    names = set(model.model_fields) - (set(config.FitConfig.model_fields) if command in OWN
                                       else set())
    if command == "serve":
        request.getfixturevalue("no_server")
    if command == "label-issues" and not (work / "cv_run").is_dir():
        with isolated(work):
            assert main(OWN["cv"][1](work)) == 0
        max((work / "runs").iterdir(), key=lambda p: p.stat().st_mtime).rename(work / "cv_run")
    monkeypatch.chdir(work)
    code, read, err = run(make(work), work, capsys)
    assert code == 0 or (command == "check" and code == 1), err  # 1: a check found a problem
    silent = []
    for name in sorted(names - read):
        if other_value(model, name) == NO_OTHER:
            continue
        argv = make(work) + argv_for(model, name)
        code, read_now, err = run(argv, work, capsys)
        flag = argv[-1] if argv[-1].startswith("--") else argv[-2]
        refused = code == 2 and flag in err and any(word in err for word in REFUSALS)
        if not refused and name not in read_now:
            silent.append(f"{' '.join(argv[len(make(work)):])} (exit {code}: "
                          f"{err.strip().splitlines()[-1] if err.strip() else ''})")
    assert silent == [], f"{command}: options neither read nor refused: {silent}"


def test_resume_refuses_every_option_but_how_it_runs(work, capsys, monkeypatch):
    """A resumed fit continues with the options it started with: any option that would
    change what it trains is refused in one line naming each; how it runs (--no-progress,
    --devices, --cache-dir) is taken."""
    monkeypatch.chdir(work)
    run_dir = str(work / "run")
    code, _, err = run(["fit", "--resume", run_dir, "--lr", "1", "--no-report"], work, capsys)
    assert code == 2 and err.strip().splitlines() == [
        "imagefit: error: --lr, --no-report: a resumed fit continues with the options it "
        "started with (RUN/config.yaml); leave them out, or start a new fit with them (a "
        "resumed fit takes only --devices, --progress, --cache-dir)"]
    code, _, err = run(["fit", "--resume", run_dir, "--config", "other.yaml"], work, capsys)
    assert code == 2 and "--config other.yaml: a resumed fit continues with the options" in err
    for name in set(config.FitConfig.model_fields) - {"devices", "progress", "cache_dir"}:
        if other_value(config.FitConfig, name) == NO_OTHER:
            continue
        argv = ["fit", "--resume", run_dir, *argv_for(config.FitConfig, name)]
        code, _, err = run(argv, work, capsys)
        assert code == 2 and argv[3] in err.splitlines()[-1], (argv, err)
    code, read, err = run(["fit", "--resume", run_dir, "--no-progress"], work, capsys)
    assert code == 0 and "progress" in read, err
    with pytest.raises(ImagefitError, match="^--epochs: a resumed fit"):
        imagefit.resume(run_dir, epochs=3)
