"""The public functions (their list: ``surface.API``): to train, ``fit``, ``resume``,
``cv``, ``sweep``, ``tune``, ``check``, ``label_issues``, ``lr_find``, ``show_batch``; for a
trained model ``load_model``, ``predict``, ``evaluate``, ``explain``, ``export``, ``serve``
and ``write_report``; listings of runs, image caches and models. Each is a thin entry into
``workflows`` (a fit as named steps, cross-validation, the model-size sweep, the search, the
tools, the server), ``evaluate`` or the module that lists. Each command of the command line
does its work through these (``surface.COMMANDS``); those that must answer without loading
torch call the same modules directly (docs/DESIGN.md)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed, runs
from .config import (
    CheckConfig,
    FitConfig,
    LabelIssuesOptions,
    merge_options,
    refuse_resume_options,
)
from .data.table import Table, from_arrays
from .errors import ImagefitError
from .evaluation.inference import evaluate, load_model, predict
from .surface import API
from .train.budget import Budget
from .train.callbacks import Callback
from .workflows.check import CheckResult, format_check
from .workflows.check import check as run_checks
from .workflows.cv import CVResult, cv, format_cv
from .workflows.explain import explain
from .workflows.export import export
from .workflows.fit import resume_options, run_fit
from .workflows.label_issues import LabelIssuesResult, format_issues
from .workflows.label_issues import label_issues as run_label_issues
from .workflows.recipes import apply_recipe
from .workflows.record import FitResult
from .workflows.serve import serve
from .workflows.sweep import SweepInterrupted, SweepResult, format_sweep, sweep
from .workflows.tools import lr_find, show_batch
from .workflows.tune import TuneInterrupted, tune
from .workflows.tune_results import TuneResult, format_tune

if TYPE_CHECKING:
    import pandas as pd

__all__ = list(API)


def fit(data: str | Path | Table, config: FitConfig | None = None, *,
        callbacks: list[Callback] | tuple = (), **options: Any) -> FitResult:
    """Train a model on ``data`` (``builtin:NAME``, a folder, a CSV or a ``Table`` from
    ``from_arrays``) and write a run directory; ``options`` override ``config``'s fields and
    ``callbacks`` join the learner's own."""
    cfg: FitConfig = merge_options(FitConfig, config, options)
    apply_recipe(cfg)
    return run_fit(data, cfg, callbacks, budget=Budget.from_options(cfg))


def resume(run: str | Path, callbacks: list[Callback] | tuple = (), **options: Any
           ) -> FitResult:
    """Continue a stopped or killed fit from its last finished epoch, in the same run
    directory: model, optimizer, schedule position, random state and metrics so far. The
    run is locked while it trains, so a run still being written cannot be resumed.
    ``options`` may change how it runs (``devices``, ``progress``, ``cache_dir``), never what
    it trains: any other option is refused."""
    refuse_resume_options(options)
    run_dir = Path(run)
    if not run_dir.is_dir() and not distributed.is_main():
        raise ImagefitError(f"run {run_dir} is not on this machine: every node reads the run "
                            "directory to resume it: give its path on a filesystem all nodes "
                            "share, or copy node 0's run directory to the same path here")
    if not run_dir.is_dir():
        raise ImagefitError(f"run {run_dir} not found: give a run directory made by "
                            "imagefit fit")
    runs.require_checkpoint(run_dir)  # before the lock file: a folder of another kind stays
    with runs.RunLock(run_dir) if distributed.is_main() else contextlib.nullcontext():
        if distributed.is_main():
            runs.remove_partial_files(run_dir)  # of a write the stopped fit was killed in
        state = runs.load_checkpoint(run_dir)
        data, cfg = resume_options(run_dir, options)
        return run_fit(data, cfg, callbacks, run_dir=run_dir, resume_state=state)


def check(data: str | Path | Table, config: CheckConfig | None = None,
          **options: Any) -> CheckResult:
    """Check ``data`` and the pipeline before training: duplicates and leakage across splits,
    labels, image statistics, one batch overfitted by the model and options a fit would use,
    and a short fit on shuffled labels; writes check.json and check.html into a new folder
    of --runs-dir (``result.check_dir``). ``result.failed`` lists the failed checks."""
    cfg: CheckConfig = merge_options(CheckConfig, config, options)
    return run_checks(data, cfg)


def label_issues(cv_dir: str | Path, out: str | Path | None = None,
                 options: LabelIssuesOptions | None = None, **values: Any) -> LabelIssuesResult:
    """The training images of a CV most likely mislabelled (cleanlab's confident learning on
    its out-of-fold probabilities), ranked, with outliers and near-duplicates; writes
    label_issues.csv (and ``out``), label_issues.json and the CV report's section. Needs
    ``imagefit[labels]``."""
    return run_label_issues(cv_dir, out, merge_options(LabelIssuesOptions, options, values))


def list_models(pattern: str | None = None, image_size: int = 224, channels: int = 3,
                costs: bool = True, limit: int = 50) -> list[dict]:
    """The model names imagefit accepts that match ``pattern`` (its own nets, its text model,
    then timm's), each with its parameters and multiply-adds for one ``image_size`` image when
    ``costs`` (for the first ``limit`` matches: each model is built to count it); a text
    model, or one that cannot run on such an image, has a ``note`` instead."""
    from .models.zoo import list_models as zoo_models

    return zoo_models(pattern, image_size, channels, costs, limit)


def list_runs(root: str | Path = "runs") -> pd.DataFrame:
    """One row per run directory in ``root`` (date, run, data, model, epochs, main metric,
    time, status), oldest first; ``format_runs`` in ``imagefit.report.history`` prints it as
    ``imagefit runs`` does."""
    from .report.history import list_runs as history

    return history(root)


def compare_runs(run_dirs: list[str | Path], out: str | Path = "curves.png") -> Path:
    """One PNG at ``out`` with the runs' learning curves side by side, a colour per run;
    returns the path written."""
    from .report.history import compare_runs as compare

    return compare(run_dirs, out)


def write_report(run: str | Path) -> Path:
    """Redraw a run's plots and its report.html from its files (after an upgrade, or a fit
    that ended before its report); returns the page's path."""
    from .report.html import regenerate

    return regenerate(run)


def list_caches(cache_dir: str | Path | None = None) -> list[dict]:
    """The image caches (``cache_dir``, default ``$IMAGEFIT_CACHE`` or
    ~/.cache/imagefit/images), most recently used first: key, what each was built from,
    images, settings, bytes, last use, whether complete and in use."""
    from .data.cache_folder import list_caches as caches

    return caches(cache_dir)


def clear_caches(cache_dir: str | Path | None = None) -> list[dict]:
    """Delete every image cache that no process is building or using; returns those it
    deleted (as ``list_caches`` gives them). One in use is kept: a fit reading it goes on."""
    from .data.cache_folder import clear_caches as clear

    return clear(cache_dir)


def summary(model: str | Path, image_size: int | None = None, channels: int | None = None,
            depth: int = 3) -> str:
    """torchinfo's table (layer, output shape, parameters, multiply-adds) of a model by name
    (ImageNet's 1,000 outputs) or of a run directory's trained model (its image size and
    channels unless given)."""
    from .models.zoo import named_summary, summary_table, text_summary_table

    path = Path(model)
    if (path / runs.MODEL_INFO).is_file():
        loaded = load_model(path, device="cpu", precision="fp32")
        shape = loaded.input
        if not shape.reads_images:
            return text_summary_table(loaded.model, shape.length, depth)
        return summary_table(loaded.model, image_size or shape.settings.size,
                             channels or shape.settings.channels, depth)
    name = str(model)
    if path.is_dir():
        raise ImagefitError(f"{path} holds no model.json: give a run directory written by "
                            "imagefit fit, or a model name")
    return named_summary(name, image_size, channels, depth)
