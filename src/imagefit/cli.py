"""The command line: parses arguments and dispatches to ``api``; no logic of its own.

Options are generated from the pydantic models in ``config.py``: every field is a flag
(``valid_pct`` -> ``--valid-pct``), ``--config FILE.yaml`` supplies values and flags
override the file.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
import typing
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from . import rendezvous
from .config import (
    RECORDED_KEYS,
    CheckConfig,
    CVConfig,
    EvaluateOptions,
    ExplainOptions,
    ExportOptions,
    FitConfig,
    LabelIssuesOptions,
    Options,
    PredictOptions,
    ServeOptions,
    ShowBatchOptions,
    SweepConfig,
    TuneConfig,
    make_options,
    read_yaml_options,
    refuse_resume_options,
    refuse_unused_options,
)
from .errors import ChecksFailed, FitInterrupted, ImagefitError, ImagefitWarning
from .version import __version__


def _type_args(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _is_text(annotation: Any) -> bool:
    return all(a is str for a in _type_args(annotation))


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in _type_args(annotation))


def _choices(annotation: Any) -> list | None:
    for arg in _type_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return None


def whole_number(least: int) -> typing.Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"give a whole number of at least {least} "
                                             f"(got '{text}')")
        return value
    return parse


def add_options(parser: argparse.ArgumentParser, model: type[Options]) -> None:
    """--config, then one flag per field of ``model``; unset flags stay absent so the file's
    values hold."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of options (the flags' names as keys); flags override it")
    group = parser.add_argument_group("options (also accepted as keys of --config FILE)")
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = field.description
        if "(default" not in help_text:
            help_text += f" (default: {'auto' if default is None else default})"
        choices = _choices(field.annotation)
        if choices:
            help_text += f"; one of: {', '.join(map(str, choices))}"
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                               metavar=name.upper(), help=help_text.replace("%", "%%"))


def _cli_value(model: type[Options], name: str, text: Any) -> Any:
    """A flag's text as the field's type expects it: lists split on commas, numbers and
    null read as YAML scalars, text fields kept as typed."""
    annotation = model.model_fields[name].annotation
    if not isinstance(text, str):
        return text
    if _is_list(annotation):
        return [part.strip() for part in text.split(",") if part.strip()]
    if _is_text(annotation):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def resolve_options(model: type[Options], args: argparse.Namespace,
                    positional: tuple[str, ...]) -> Options:
    """Defaults, then the --config file, then the flags."""
    values = read_yaml_options(args.config) if args.config else {}
    for key in (*positional, *RECORDED_KEYS):  # a run's config.yaml records them too
        values.pop(key, None)
    for name in model.model_fields:
        if hasattr(args, name):
            values[name] = _cli_value(model, name, getattr(args, name))
    options = make_options(model, values)
    refuse_unused_options(options)
    _refuse_images_beyond_memory(options)
    return options


def _refuse_images_beyond_memory(options: Options) -> None:
    """An image size whose images alone exceed the memory, refused before torch is imported
    (the preflight, which needs the data and the model, refines it later)."""
    from .data.resources import check_one_image_fits

    channels = getattr(options, "channels", None)  # one image: a batch is cut to the data
    if getattr(options, "image_size", None):
        check_one_image_fits("--image-size", options.image_size, channels)
    if getattr(options, "image_sizes", None):
        check_one_image_fits("--image-sizes", max(options.image_sizes), channels)


def data_command(commands, name: str, model: type[Options], help: str,
                 description: str) -> argparse.ArgumentParser:
    """A command that reads DATA and takes ``model``'s options as flags."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("data", metavar="DATA", help="folder, CSV file or builtin:NAME")
    add_options(parser, model)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagefit",
        description="Train image models from a folder, a CSV file or a built-in dataset.",
    )
    parser.add_argument("--version", action="version", version=f"imagefit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = commands.add_parser(
        "fit", help="train a model and write a run directory",
        description="Train a model on DATA. The last line printed is the run directory.",
    )
    fit.add_argument("data", metavar="DATA", nargs="?",
                     help="a folder of class folders (optionally in train/ valid/ test/), a "
                     "CSV file, or builtin:digits / builtin:fashion-mnist")
    fit.add_argument("--resume", metavar="RUN", help="continue the stopped or killed fit of "
                     "this run directory from its last finished epoch (no DATA or options)")
    add_options(fit, FitConfig)
    nodes = fit.add_argument_group(
        "several machines (each runs the same command with its own --node-rank; the run "
        "directory, checkpoints and report are written on node 0)")
    nodes.add_argument("--nnodes", metavar="N", default="1",
                       help="machines that train together, each with --devices processes "
                       "(default: 1)")
    nodes.add_argument("--node-rank", metavar="R", default="0",
                       help="this machine's number, 0 to N-1; node 0 holds rank 0 (default: 0)")
    nodes.add_argument("--master", metavar="HOST:PORT",
                       help="where node 0 listens for the others: its address and a free port, "
                       "the same on every node")
    nodes.add_argument("--join-timeout", metavar="SECONDS",
                       help="how long each node waits for the others, saying every "
                       f"{rendezvous.WAIT_LINE_EVERY} s whom it waits for; then it stops in "
                       f"one line naming them (default: {rendezvous.JOIN_TIMEOUT}, time to "
                       "start the nodes by hand)")

    predict = commands.add_parser(
        "predict", help="predict images (or texts) with a trained model",
        description="Predict INPUTs (image files, folders, or CSV files of paths) with the "
        "model of RUN; a text model predicts the texts of --text and of CSV files.",
    )
    predict.add_argument("run", metavar="RUN", help="run directory written by imagefit fit, "
                         "or an ONNX file written by imagefit export (run by onnxruntime)")
    predict.add_argument("inputs", metavar="INPUT", nargs="*",
                         help="image file, folder of images, or CSV file of paths (of texts, "
                         "for a text model)")
    predict.add_argument("--text", metavar="TEXT", nargs="+", dest="texts",
                         help="texts to predict with a text model, e.g. --text maria jose")
    predict.add_argument("--out", metavar="CSV", help="write the predictions to this CSV file "
                         "(default: print them)")
    add_options(predict, PredictOptions)

    evaluate = commands.add_parser(
        "evaluate", help="measure a trained model on a dataset",
        description="Evaluate the model of RUN on DATA: its test split when it has one, "
        "else its validation split.",
    )
    evaluate.add_argument("run", metavar="RUN", help="run directory written by imagefit fit")
    evaluate.add_argument("data", metavar="DATA", help="folder, CSV file or builtin:NAME")
    evaluate.add_argument("--out", metavar="JSON", help="also write the metrics to this file")
    add_options(evaluate, EvaluateOptions)

    finder = commands.add_parser(
        "lr-find", help="sweep the learning rate and suggest one",
        description="Train briefly with a growing learning rate on DATA (the model and "
        "options a fit would use, in its precision), save the loss curve with the "
        "suggestions marked, and print them. The model is not kept.",
    )
    finder.add_argument("data", metavar="DATA", help="folder, CSV file or builtin:NAME")
    finder.add_argument("--out", metavar="PNG", default="lr_find.png",
                        help="where to save the plot (default: lr_find.png)")
    add_options(finder, FitConfig)

    show = commands.add_parser(
        "show-batch", help="save a grid of augmented training images",
        description="Save a grid of DATA's training images as augmentation makes them, "
        "with their (mixed) labels.",
    )
    show.add_argument("data", metavar="DATA", help="folder, CSV file or builtin:NAME")
    show.add_argument("--out", metavar="PNG", required=True, help="where to save the grid")
    add_options(show, ShowBatchOptions)

    data_command(
        commands, "check", CheckConfig, help="check the data and the pipeline before training",
        description="Check DATA with the model and options a fit would use: exact and near "
        "duplicates within and across splits, leakage into validation and test, label "
        "balance and folds, a label written into the pixels, image statistics, unreadable "
        "and blank images, one batch overfitted, and a short fit on shuffled labels. Prints "
        "a verdict table, writes check.json and check.html into a new folder of --runs-dir "
        "(the last line printed) and exits 1 when a check fails (rules: docs/CHECKS.md).",
    )

    data_command(
        commands, "cv", CVConfig,
        help="k-fold cross-validation: a model per fold, out-of-fold predictions",
        description="Train a model on each of --folds folds of DATA's training rows (each "
        "fold validates the model trained on the others); write the out-of-fold "
        "predictions, a metrics table per fold, the mean and spread, and a report. "
        "`imagefit predict CV_DIR ...` averages the fold models.",
    )

    data_command(
        commands, "sweep", SweepConfig,
        help="overfit on purpose: the same fit for several model sizes, compared",
        description="Train each model of --models (any --model of fit) or --widths (the "
        "small nets small_cnn_W) on DATA with the same options and early stopping; write a "
        "run directory per model, sweep.csv and sweep.json (a row per model: parameters, "
        "best validation figure, its epoch, the gap between validation and training loss "
        "there) and sweep.png (the losses and the gap per epoch). With --budget the models "
        "share the time. The last line printed is the sweep directory; the exit status is 1 "
        "when a model failed.",
    )

    data_command(
        commands, "tune", TuneConfig,
        help="search fit options with Optuna: trials as runs, pruning, shared storage",
        description="Search the fit options of --space (a YAML file; default: lr, wd, label "
        "smoothing, dropout, mixup) for the best validation metric on DATA with Optuna's TPE "
        "sampler, each trial an ordinary fit in RUNS_DIR/STUDY_tune/trials, trials that lag "
        "stopped early by the pruner. The study lives in a SQLite file there, or in "
        "--storage (e.g. PostgreSQL) shared by tune commands on several machines; --workers "
        "K runs K local processes; the same command again continues the study. Writes "
        "tune.csv, tune.json, best.yaml (for imagefit fit --config) and tune.html (pip "
        "install 'imagefit[tune]'). The last line printed is the tune directory.",
    )

    issues = commands.add_parser(
        "label-issues", help="the training images most likely mislabelled, from a CV",
        description="Rank the training images of CV_DIR (written by imagefit cv) most likely "
        "mislabelled, by confident learning (cleanlab) on the out-of-fold probabilities; "
        "find outliers and near-duplicates on thumbnails of the images (of texts, on every "
        "fold model's features); write "
        "label_issues.csv (rank, row, fold, path, given, suggested, score) and a section of "
        "the CV report. imagefit fit DATA --drop-rows or --relabel CSV acts on it. Needs "
        "imagefit[labels].",
    )
    issues.add_argument("cv_dir", metavar="CV_DIR", help="CV directory written by imagefit cv")
    issues.add_argument("--out", metavar="CSV", help="also write the issues to this file "
                        "(default: CV_DIR/label_issues.csv only)")
    add_options(issues, LabelIssuesOptions)

    explainer = commands.add_parser(
        "explain", help="saliency maps: where the model looks; feature maps: what a layer sees",
        description="Write a saliency overlay PNG per IMAGE (files, folders or CSV files of "
        "paths) to --out: Grad-CAM (where the evidence for the class lies) or guided "
        "backprop (which pixels move the output); or, with --method feature-maps, a grid of "
        "the output of one layer (--layer), a tile per channel.",
    )
    explainer.add_argument("run", metavar="RUN", help="run directory written by imagefit fit")
    explainer.add_argument("images", metavar="IMAGE", nargs="+",
                           help="image file, folder of images, or CSV file of paths")
    explainer.add_argument("--out", metavar="DIR", default="explain",
                           help="folder for the overlays (default: explain)")
    add_options(explainer, ExplainOptions)

    exporter = commands.add_parser(
        "export", help="export a run's model to ONNX, checked against PyTorch",
        description="Export RUN's model to ONNX (pip install 'imagefit[export]'): the graph "
        "takes uint8 images (N, C, S, S) at the model's size, or a text model's character "
        "indices, normalizes them inside and gives the task's probabilities or values; "
        "model.json and the resize policy go in its metadata and in FILE.json. onnxruntime's "
        "outputs are checked against PyTorch's on images of the run's own data: a difference "
        "above 1e-4 is an error.",
    )
    exporter.add_argument("run", metavar="RUN", help="run directory written by imagefit fit")
    exporter.add_argument("--out", metavar="FILE", help="the ONNX file (default RUN/model.onnx)")
    add_options(exporter, ExportOptions)

    server = commands.add_parser(
        "serve", help="serve a model: a page to drop images on and a JSON API",
        description="Serve SOURCE (a run directory, a CV directory, or an ONNX file written by "
        "imagefit export, run by onnxruntime) over HTTP (pip install 'imagefit[serve]'): a "
        "page at / to drop images on and see their top classes and Grad-CAM overlays, POST "
        "/predict (multipart images -> JSON), GET /model and GET /health. Runs until Ctrl-C.",
    )
    server.add_argument("source", metavar="SOURCE",
                        help="run directory, CV directory or exported .onnx file")
    add_options(server, ServeOptions)

    report = commands.add_parser(
        "report", help="write a run's report.html again",
        description="Redraw RUN's plots from its own files (training log, saved predictions) "
        "and write its report.html again. Prints the page's path.",
    )
    report.add_argument("run", metavar="RUN", help="run directory written by imagefit fit")

    listing = commands.add_parser(
        "runs", help="list runs, or compare their curves",
        description="List the runs in DIR (default: runs) with their data, model, epochs, "
        "main metric and time; with --compare, overlay the curves of the given runs.",
    )
    listing.add_argument("dir", metavar="DIR", nargs="?", default="runs",
                         help="folder of run directories (default: runs)")
    listing.add_argument("--compare", metavar="RUN", nargs="+",
                         help="run directories whose loss and metric curves to overlay")
    listing.add_argument("--out", metavar="PNG", default="compare.png",
                         help="where --compare saves its plot (default: compare.png)")

    listing_models = commands.add_parser(
        "models", help="the model names imagefit accepts, with their size and cost",
        description="List imagefit's own nets and every timm model whose name matches "
        "PATTERN (wildcards, e.g. 'regnety_*'; a plain word matches names containing it), "
        "with parameters and multiply-adds (MACs) of one image of --image-size, counted by "
        "torchinfo for the first --limit matches.",
    )
    listing_models.add_argument("pattern", metavar="PATTERN", nargs="?",
                                help="names to list (default: all)")
    listing_models.add_argument("--image-size", type=whole_number(8), default=224,
                                help="side of the image the MACs are counted at (default 224)")
    listing_models.add_argument("--channels", type=whole_number(1), default=3,
                                help="input channels (default 3)")
    listing_models.add_argument("--limit", type=whole_number(1), default=50,
                                help="count parameters and MACs of this many matches at most "
                                "(default 50; each model is built)")
    listing_models.add_argument("--no-costs", dest="costs", action="store_false",
                                help="list the names only")

    summarizing = commands.add_parser(
        "summary", help="a model's layers: output shapes, parameters, MACs",
        description="Print torchinfo's table of MODEL (a model name, with ImageNet's 1,000 "
        "outputs) or of RUN's trained model: each layer's output shape, parameters and "
        "multiply-adds for one image.",
    )
    summarizing.add_argument("model", metavar="MODEL|RUN",
                             help="a model name (imagefit models lists them) or a run "
                             "directory")
    summarizing.add_argument("--image-size", type=whole_number(8),
                             help="image side (default: the run's, or 224)")
    summarizing.add_argument("--channels", type=whole_number(1),
                             help="input channels (default: the run's, or 3)")
    summarizing.add_argument("--depth", type=whole_number(0), default=3,
                             help="how deep into nested modules the table goes (default 3)")

    cache = commands.add_parser(
        "cache", help="list or clear the decoded-image cache",
        description="The decoded-image cache ($IMAGEFIT_CACHE, default ~/.cache/imagefit/"
        "images) keeps each dataset's images decoded at each size; it is held under "
        "$IMAGEFIT_CACHE_LIMIT (default 20G) by removing the caches used least recently. "
        "ls lists the caches, clear removes those no running command uses.",
    )
    cache.add_argument("action", choices=["ls", "clear"], help="ls: list; clear: remove")
    cache.add_argument("--cache-dir", metavar="DIR",
                       help="the cache folder (default: $IMAGEFIT_CACHE or ~/.cache/imagefit/"
                       "images)")
    return parser


def _format_metrics(metrics: dict, shown: list[str]) -> str:
    """The per-epoch metrics (and the main metric with TTA) of each split, on one line."""
    names = [name for name in shown if name.startswith("valid_")]
    keys = []
    for split in ("valid_", "test_"):
        for name in names:
            keys += [split + name.removeprefix("valid_")]
        if names:
            main = names[1] if len(names) > 1 else names[0]
            keys.append(f"{split}tta_{main.removeprefix('valid_')}")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys
                     if isinstance(metrics.get(k), (int, float)))


def _format_evaluation(results: dict) -> str:
    """split and counts, then one line per metric; with TTA a table of both figures."""
    lines = [f"{k}: {v}" for k, v in results.items() if not isinstance(v, float)]
    names = [k for k, v in results.items() if isinstance(v, float) and not k.startswith("tta_")]
    if not any(k.startswith("tta_") for k in results):
        return "\n".join(lines + [f"{name}: {results[name]:.4f}" for name in names])
    width = max(map(len, names), default=0)
    lines.append(f"{'metric':<{width}}  {'plain':>9}  {'with TTA':>9}")
    for name in names:
        lines.append(f"{name:<{width}}  {results[name]:>9.4f}  "
                     f"{results.get('tta_' + name, float('nan')):>9.4f}")
    return "\n".join(lines)


def _fit(args: argparse.Namespace, argv: list[str]) -> int:
    config, given = None, {}
    if args.resume:
        if args.data:
            raise ImagefitError("--resume RUN takes its data and options from the run: "
                                "leave out DATA")
        if args.config:
            raise ImagefitError(f"--config {args.config}: a resumed fit continues with the "
                                "options it started with (RUN/config.yaml); leave it out")
        given = {name: _cli_value(FitConfig, name, getattr(args, name))
                 for name in FitConfig.model_fields if hasattr(args, name)}
        resumed = make_options(FitConfig, given)  # each value checked, then the rule
        given = {name: getattr(resumed, name) for name in given}
        refuse_resume_options(given)  # before processes are launched
        devices = resumed.devices
    else:
        if not args.data and args.config:  # a run's config.yaml names its data
            args.data = read_yaml_options(args.config).get("data")
        if not args.data:
            raise ImagefitError("give DATA to fit, or --resume RUN")
        config = resolve_options(FitConfig, args, ("data",))
        devices = config.devices
    nodes = rendezvous.parse_nodes(args.nnodes, args.node_rank, args.master,
                                   args.join_timeout)  # before torch loads: at once
    from . import api, distributed

    if (devices > 1 or nodes is not None) and not distributed.launched():
        return distributed.launch(argv, devices, device=config.device if config else "auto",
                                  nodes=nodes)
    if config is not None and config.budget:
        _start_budget_clock(args)
    result = api.resume(args.resume, **given) if config is None else \
        api.fit(args.data, config)
    if not distributed.is_main():
        return 0
    shown = list(result.history[-1]) if result.history else []
    print(_format_metrics(result.metrics, shown))
    if (result.run_dir / "report.html").is_file():
        print(f"report: {result.run_dir / 'report.html'}")
    print(result.run_dir)
    return 0


def _start_budget_clock(args: argparse.Namespace) -> None:
    """A --budget counts from the process's start (``imagefit`` from a shell), else from the
    call of ``main``."""
    from .train import budget

    budget.mark_command_start(process=args.whole_process, now=args.called_at)


def _predict(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api

    options = resolve_options(PredictOptions, args, ("run", "inputs", "out", "texts"))
    if not args.inputs and not args.texts:
        raise ImagefitError("give images, folders or CSV files to predict (or --text TEXT... "
                            "for a text model)")
    frame = api.predict(args.run, args.inputs, args.out, options, texts=args.texts)
    if args.out:
        print(f"wrote {len(frame)} predictions to {args.out}")
    else:
        print(frame.to_csv(index=False), end="")
    return 0


def _evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api

    options = resolve_options(EvaluateOptions, args, ("run", "data", "out"))
    results = api.evaluate(args.run, args.data, args.out, options)
    print(_format_evaluation(results))
    return 0


def _lr_find(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api

    config = resolve_options(FitConfig, args, ("data", "out"))
    result = api.lr_find(args.data, args.out, config)
    for name, lr in result.suggestions.items():
        print(f"{name}: {lr:.2e}")
    print(args.out)
    return 0


def _show_batch(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api

    options = resolve_options(ShowBatchOptions, args, ("data", "out"))
    print(api.show_batch(args.data, args.out, options))
    return 0


def _cv(args: argparse.Namespace, argv: list[str]) -> int:
    config = resolve_options(CVConfig, args, ("data",))
    from .api import cv, format_cv

    if config.budget:
        _start_budget_clock(args)
    result = cv(args.data, config)
    print(format_cv(result))
    print(f"report: {result.cv_dir / 'report.html'}")
    print(result.cv_dir)
    return 0


def _sweep(args: argparse.Namespace, argv: list[str]) -> int:
    config = resolve_options(SweepConfig, args, ("data",))
    from .api import SweepInterrupted, format_sweep, sweep

    if config.budget:
        _start_budget_clock(args)
    try:
        result = sweep(args.data, config)
    except SweepInterrupted as interrupted:
        print(format_sweep(interrupted.result))
        print(f"imagefit: {interrupted}; the sweep directory keeps their runs, table and "
              "figure", file=sys.stderr)
        print(interrupted.result.sweep_dir)
        return 130
    print(format_sweep(result))
    print(f"figure: {result.sweep_dir / 'sweep.png'}")
    print(result.sweep_dir)
    return 1 if result.failed else 0


def _tune(args: argparse.Namespace, argv: list[str]) -> int:
    config = resolve_options(TuneConfig, args, ("data",))
    from .api import TuneInterrupted, format_tune, tune

    try:
        result = tune(args.data, config)
    except TuneInterrupted as interrupted:
        print(format_tune(interrupted.result))
        print(f"imagefit: {interrupted}; the study keeps them: run the same command to "
              "continue it", file=sys.stderr)
        print(interrupted.result.tune_dir)
        return 130
    print(format_tune(result))
    print(f"report: {result.tune_dir / 'tune.html'}")
    print(result.tune_dir)
    return 0


def _check(args: argparse.Namespace, argv: list[str]) -> int:
    config = resolve_options(CheckConfig, args, ("data",))
    from .api import check, format_check

    result = check(args.data, config)
    print(format_check(result))
    print(f"report: {result.check_dir / 'check.html'}")
    print(result.check_dir)
    return 1 if result.failed else 0


def _label_issues(args: argparse.Namespace, argv: list[str]) -> int:
    options = resolve_options(LabelIssuesOptions, args, ("cv_dir", "out"))
    from .api import format_issues, label_issues

    result = label_issues(args.cv_dir, args.out, options)
    print(format_issues(result))
    print(f"report: {Path(args.cv_dir) / 'report.html'}")
    print(result.csv)
    return 0


def _explain(args: argparse.Namespace, argv: list[str]) -> int:
    from .api import explain

    options = resolve_options(ExplainOptions, args, ("run", "images", "out"))
    written = explain(args.run, args.images, args.out, options)
    print(f"wrote {len(written)} overlays to {args.out}")
    return 0


def _export(args: argparse.Namespace, argv: list[str]) -> int:
    from .api import export

    options = resolve_options(ExportOptions, args, ("run", "out"))
    done = export(args.run, args.out, options)
    parity = done["parity"]
    print(f"parity: outputs within {parity['max_abs_diff']:.2e} of PyTorch's on "
          f"{parity['inputs']} inputs (limit {parity['limit']:g})")
    print(done["file"])
    return 0


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    from .api import serve

    serve(args.source, resolve_options(ServeOptions, args, ("source",)))
    return 0


def _report(args: argparse.Namespace, argv: list[str]) -> int:
    from .report.html import regenerate

    print(regenerate(args.run))
    return 0


def _runs(args: argparse.Namespace, argv: list[str]) -> int:
    from .report.history import compare_runs, format_runs, list_runs

    if args.compare:
        print(compare_runs(args.compare, args.out))
    else:
        print(format_runs(list_runs(args.dir)))
    return 0


def _models(args: argparse.Namespace, argv: list[str]) -> int:
    from .models.zoo import list_models  # torch and timm only: no trainer to import

    found = list_models(args.pattern, args.image_size, args.channels, args.costs, args.limit)
    if not found:
        print(f"no model name matches '{args.pattern}'")
        return 0
    width = max(len(row["model"]) for row in found)
    if args.costs:
        print(f"{'model':<{width}}  {'params':>13}  {'GMACs':>8}  (one {args.image_size} px "
              f"image, {args.channels} channel(s), 1,000 outputs)")
    for row in found:
        if "params" in row:
            print(f"{row['model']:<{width}}  {row['params']:>13,}  {row['macs'] / 1e9:>8.3f}")
        elif "note" in row:
            print(f"{row['model']:<{width}}  {'-':>13}  {'-':>8}  {row['note']}")
        else:
            print(row["model"])
    if args.costs and len(found) > args.limit:
        print(f"({len(found) - args.limit} more not counted: give --limit or a narrower "
              "PATTERN)")
    return 0


def _summary(args: argparse.Namespace, argv: list[str]) -> int:
    if Path(args.model).exists():  # a run directory: its model, through the api
        from .api import summary

        print(summary(args.model, args.image_size, args.channels, args.depth))
        return 0
    from .models.zoo import named_summary  # a name: no trainer to import (under 5 s)

    print(named_summary(args.model, args.image_size, args.channels, args.depth))
    return 0


def _cache(args: argparse.Namespace, argv: list[str]) -> int:
    from .data import cache_folder as cache

    root = Path(args.cache_dir) if args.cache_dir else cache.default_cache_root()
    if args.action == "clear":
        removed = cache.clear_caches(root)
        kept = len(cache.list_caches(root))
        freed = sum(e["bytes"] for e in removed)
        print(f"removed {len(removed)} cache(s) from {root}, {_size(freed)} freed"
              + (f"; {kept} in use kept" if kept else ""))
        return 0
    print(_format_caches(root, cache.list_caches(root), cache.cache_limit()))
    return 0


def _format_caches(root: Path, entries: list[dict], limit: int) -> str:
    """The caches as a table, most recently used first, with the total against the limit."""
    total = sum(e["bytes"] for e in entries)
    head = (f"{root}: {len(entries)} cache(s), {_size(total)} of "
            f"{_size(limit) if limit else 'no'} limit")
    if not entries:
        return head
    lines = [head, f"{'key':<20}  {'last used':<16}  {'images':>7}  {'size':>6}  "
                   f"{'px':>4}  {'ch':>2}  {'state':<8}  data"]
    for e in entries:
        settings = e["settings"] or {}
        state = "in use" if e["in_use"] else "ready" if e["complete"] else "partial"
        used = datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M")
        lines.append(f"{e['key']:<20}  {used:<16}  {e['images'] or '-':>7}  "
                     f"{_size(e['bytes']):>6}  {settings.get('size', '-'):>4}  "
                     f"{settings.get('channels', '-'):>2}  {state:<8}  {e['description']}")
    return "\n".join(lines)


def _size(count: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if count < 1024:
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count:.1f}T"


COMMANDS = {"fit": _fit, "predict": _predict, "evaluate": _evaluate, "lr-find": _lr_find,
            "show-batch": _show_batch, "check": _check, "cv": _cv,
            "label-issues": _label_issues, "explain": _explain, "export": _export,
            "serve": _serve, "report": _report,
            "runs": _runs, "cache": _cache, "models": _models, "summary": _summary, "sweep": _sweep,
            "tune": _tune}


def run_command(args: argparse.Namespace, argv: list[str] = ()) -> int:
    """Dispatch to the command's function; each imports what it uses, so that help and
    option errors answer without loading torch."""
    return COMMANDS[args.command](args, list(argv))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, ImagefitWarning):
        print(f"imagefit: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    called_at = time.monotonic()
    whole_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.called_at, args.whole_process = called_at, whole_process
    warnings.showwarning = _show_warning
    try:
        return run_command(args, argv)
    except ChecksFailed as failed:
        print(f"imagefit: {failed}", file=sys.stderr)
        return 1
    except ImagefitError as error:
        print(f"imagefit: error: {error}", file=sys.stderr)
        return 2
    except FitInterrupted as interrupted:
        if interrupted.run_dir is None:
            print("imagefit: interrupted before the first epoch finished: nothing was kept "
                  "(the run directory was removed)", file=sys.stderr)
            return 130
        print(f"imagefit: {interrupted}; the run directory keeps its model and metrics",
              file=sys.stderr)
        print(interrupted.run_dir)
        return 130
    except KeyboardInterrupt:
        print("imagefit: interrupted", file=sys.stderr)
        return 130
