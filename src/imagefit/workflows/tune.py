"""imagefit tune: a hyperparameter search on Optuna. Each trial is an ordinary fit in a run
directory of its own (``TUNE_DIR/trials/trial_NNNN``) with options drawn by Optuna's TPE
sampler from the space (a YAML file, or ``DEFAULT_SPACE``); after every epoch the trial
reports its validation metric, and the pruner (median by default) stops a trial that lags
the others at the same epoch. The study lives in an Optuna storage: a SQLite file in the tune
directory unless ``--storage`` names another (PostgreSQL, ...), which tune commands on several
machines then share; ``--workers K`` starts K local processes on it. The same command run
again continues the study (``--n-trials`` counts the trials it holds in all).

At the end the tune directory holds tune.csv and tune.json (a row per trial), best.yaml (the
best trial's options, for ``imagefit fit DATA --config best.yaml``), Optuna's plots and
tune.html; with ``--confirm N`` (3) the three best trials' options and the defaults are
fitted again on N fresh seeds each, and best.yaml holds the options with the best median.
"""

from __future__ import annotations

import difflib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import distributed, runs
from ..config import (
    AugmentOptions,
    FitConfig,
    SourceOptions,
    TuneConfig,
    fit_options,
    make_options,
    merge_options,
)
from ..data.inputs import table_input
from ..data.prepare import resolve_settings
from ..data.sources import read_source
from ..data.table import Table
from ..errors import FitInterrupted, ImagefitError
from ..models import SMALL_CNN_WIDTHS, check_model_name, default_model_name
from ..tasks import HIGHER_IS_BETTER
from ..train.budget import Budget, parse_duration
from ..train.callbacks import Callback
from .build import apply_recipe, apply_small_image_recipe, check_data, choose_photo_weights
from .fit import run_fit, run_name
from .preflight import check_workers_room
from .sweep import folder_name, one_line, require_validation

MISSING = "tune needs optuna: pip install 'imagefit[tune]' (or pip install optuna)"
TUNE_SETUP, TUNE_INFO, TUNE_TABLE, BEST = "tune.yaml", "tune.json", "tune.csv", "best.yaml"
STUDY_FILE = "study.db"
SPACE_KINDS = ("float", "log-float", "int", "log-int", "categorical")
SPEC_KEYS = {"type", "low", "high", "step", "choices"}
# Options that say where and how a fit runs, not what it learns: not searched.
NOT_SEARCHED = set(SourceOptions.model_fields) | {
    "runs_dir", "name", "progress", "report", "device", "devices", "cache_dir", "check",
    "budget", "test_every_epoch", "metrics", "find_label_issues", "drop_rows", "relabel",
    "top", "min_score"}
FAILURES_IN_A_ROW = 3
CONFIRM_TOP = 3  # trials refitted by --confirm
ALIASES = {"learning_rate": "lr", "weight_decay": "wd", "batch_size": "bs",
           "architecture": "model", "n_epochs": "epochs"}
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 60


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ImagefitError(MISSING) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's line is ours
    return optuna


# -- the space ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """One searched option: its kind and range (low, high, step) or choices."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind in ("int", "log-int"):
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.kind == "log-int")
        return trial.suggest_float(self.name, self.low, self.high, step=self.step,
                                   log=self.kind == "log-float")

    def as_yaml(self) -> dict:
        if self.kind == "categorical":
            return {"type": self.kind, "choices": list(self.choices)}
        spec = {"type": self.kind, "low": self.low, "high": self.high}
        return spec | ({"step": self.step} if self.step is not None else {})


def read_space(path: str | Path) -> list[Parameter]:
    """The space in a YAML file: ``option: {type: ..., low: ..., high: ...}`` (or a list of
    choices) per searched fit option; every mistake is one line naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ImagefitError(f"--space {path}: no such file: give a YAML file of the options "
                            "to search (docs/TUNE.md)")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ImagefitError(f"{path}{where}: not readable as YAML ({problem}): fix the file"
                            ) from None
    return parse_space(values, str(path))


def parse_space(values: Any, source: str) -> list[Parameter]:
    if not isinstance(values, dict) or not values:
        raise ImagefitError(f"{source}: the space is a mapping of fit options to their "
                            "ranges, e.g. 'lr: {type: log-float, low: 1e-4, high: 1e-2}'")
    parameters = []
    for key, spec in values.items():
        name = str(key).replace("-", "_")
        where = f"{source}: {key}"
        if name not in FitConfig.model_fields and name not in AugmentOptions.model_fields:
            known = [*FitConfig.model_fields, *AugmentOptions.model_fields]
            close = [ALIASES[name]] if name in ALIASES else difflib.get_close_matches(
                name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ImagefitError(f"{where}: not an option of imagefit fit{hint}; the space's "
                                "keys are fit options such as lr, wd, dropout")
        if name in NOT_SEARCHED:
            raise ImagefitError(f"{where}: says how or where a fit runs, not what it learns: "
                                "give it as a tune option instead")
        parameters.append(_parameter(name, spec, where))
    return parameters


def _parameter(name: str, spec: Any, where: str) -> Parameter:
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ImagefitError(f"{where}: give a mapping with a type ({', '.join(SPACE_KINDS)}) "
                            "and its range or choices, or a list of choices")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ImagefitError(f"{where}: unknown key '{unknown[0]}'; a range has type, low, high "
                            "and step, a categorical type and choices")
    kind = spec.get("type")
    if kind not in SPACE_KINDS:
        raise ImagefitError(f"{where}: type {kind!r} is not one of {', '.join(SPACE_KINDS)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ImagefitError(f"{where}: a categorical needs a non-empty list of choices")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ImagefitError(f"{where}: choice {choice!r} is not a number, text, "
                                    "true/false or null")
            _check_value(name, choice, where)
        return Parameter(name, kind, choices=tuple(choices))
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    for label, value in (("low", low), ("high", high), ("step", step)):
        if value is None and label != "step":
            raise ImagefitError(f"{where}: a {kind} range needs low and high")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ImagefitError(f"{where}: {label} {value!r} is not a number")
        if value is not None and kind.endswith("int") and float(value) != int(value):
            raise ImagefitError(f"{where}: {label} {value} is not a whole number ({kind})")
    if not low < high:
        raise ImagefitError(f"{where}: low {low} is not below high {high}")
    if kind.startswith("log") and low <= 0:
        raise ImagefitError(f"{where}: a log range needs low above 0 (got {low})")
    if step is not None and (step <= 0 or kind.startswith("log")):
        raise ImagefitError(f"{where}: step must be above 0, and a log range takes none")
    for value in (low, high):
        _check_value(name, int(value) if kind.endswith("int") else float(value), where)
    return Parameter(name, kind, float(low), float(high), None if step is None else float(step))


def fit_defaults(table: Table, cfg: FitConfig) -> FitConfig:
    """The options a fit of ``table`` would use where ``cfg`` leaves them unset: the
    recipes' and the small-image recipe's (SGD at 0.1 for imagefit's small nets, ...)."""
    probe = fit_options(cfg)
    apply_recipe(probe)
    if table_input(table).reads_images:
        size = probe.image_size or (max(probe.image_sizes) if probe.image_sizes else None)
        settings = resolve_settings(table, size, probe.channels, probe.resize, probe.seed)
        choose_photo_weights(probe, settings.size, say=False)
        apply_small_image_recipe(probe, settings.size, table.task.single_label)
        if probe.model == "auto" and not probe.pretrained:
            probe.model = default_model_name(settings.size, table.task.single_label)
    return probe


def default_space(table: Table, cfg: FitConfig) -> list[Parameter]:
    """Around the fit's own defaults: the learning rate from a tenth to three times its
    default, the weight decay a decade either side, label smoothing 0-0.2, MixUp off or on
    (as the task allows), and the width of imagefit's small net when that is the model."""
    probe = fit_defaults(table, cfg)
    lr = probe.lr if isinstance(probe.lr, (int, float)) else 3e-3  # --lr auto: the usual
    wd = max(float(probe.wd), 1e-6)
    values = {"lr": {"type": "log-float", "low": lr / 10, "high": lr * 3},
              "wd": {"type": "log-float", "low": wd / 10, "high": wd * 10},
              "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
              "mixup": {"type": "categorical", "choices": [0.0, 0.2, 0.4]}}
    chosen = {k: values[k] for k in table.task.searched}
    if probe.model in SMALL_CNN_WIDTHS.values():
        chosen["model"] = {"type": "categorical", "choices": list(SMALL_CNN_WIDTHS.values())}
    return parse_space(chosen, "the default space")


def default_trial(table: Table, cfg: FitConfig, space: list[Parameter]) -> dict:
    """The fit's defaults for the searched options, where the space holds them: the first
    trial, so that the search starts from what a plain fit would do."""
    probe = fit_defaults(table, cfg)
    augment = probe.augment_options.model_dump() if probe.augment_options else \
        AugmentOptions().model_dump()
    chosen = {}
    for p in space:
        value = getattr(probe, p.name) if p.name in FitConfig.model_fields else augment.get(
            p.name)
        if p.kind == "categorical":
            if value in p.choices:
                chosen[p.name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and \
                p.low <= value <= p.high:
            chosen[p.name] = int(value) if p.kind.endswith("int") else float(value)
    return chosen


def _check_value(name: str, value: Any, where: str) -> None:
    """A value the fit option accepts, or one line saying why not."""
    try:
        if name in AugmentOptions.model_fields:
            make_options(AugmentOptions, {name: value})
        else:
            make_options(FitConfig, {name: value})
        if name == "model" and value != "auto":  # a name no trial could build: now
            check_model_name(value)
    except ImagefitError as error:
        raise ImagefitError(f"{where}: {value!r} is not a value of imagefit fit's --"
                            f"{name.replace('_', '-')} ({error})") from None


# -- the study ----------------------------------------------------------------------------


def storage_url(cfg: TuneConfig, tune_dir: Path) -> str:
    return cfg.storage or f"sqlite:///{(tune_dir / STUDY_FILE).resolve()}"


def shown_url(url: str) -> str:
    """A storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: Optuna will say so
        return url


def sampler_seed(cfg: TuneConfig, worker: int) -> int:
    """Each worker's sampler draws from a seed of its own: from --seed and the worker's
    number on the tune directory's own study (the same command draws the same trials), and
    on a shared --storage from the host and process too, as separate commands would
    otherwise draw the same options."""
    seed = cfg.seed * 1009 + worker
    if cfg.storage is None:
        return seed
    import hashlib

    mixed = f"{seed}:{os.uname().nodename}:{os.getpid()}".encode()
    return int.from_bytes(hashlib.sha256(mixed).digest()[:4], "little")


def open_study(optuna, url: str, name: str, direction: str, cfg: TuneConfig, worker: int = 0):
    """The study in ``url`` (created when absent), with the sampler and pruner of ``cfg``;
    each worker's sampler has a seed of its own (``sampler_seed``)."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        storage = _storage(optuna, url, engine)
    except ImportError as error:
        raise ImagefitError(f"--storage {shown_url(url)}: its database driver is missing "
                            f"({error.name or error}): install it, e.g. pip install "
                            "psycopg2-binary for PostgreSQL") from None
    except Exception as error:  # SQLAlchemy's and the driver's many kinds
        raise ImagefitError(f"--storage {shown_url(url)}: cannot open it ({type(error).__name__}"
                            f": {str(error).strip().splitlines()[0][:200]})") from None
    warmup = 3 if cfg.budget else 2  # tenths of a budget trial's schedule, or epochs
    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=4,
                                                             n_warmup_steps=warmup),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
               "none": optuna.pruners.NopPruner}
    study = optuna.create_study(storage=storage, study_name=name, direction=direction,
                                sampler=optuna.samplers.TPESampler(seed=sampler_seed(cfg, worker),
                                                                   n_startup_trials=6),
                                pruner=pruners[cfg.pruner](), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ImagefitError(f"study {name} in {shown_url(url)} {study.direction.name.lower()}s "
                            f"its objective, this one would {direction} it: give another "
                            "--study")
    return study


def _storage(optuna, url: str, engine: dict, tries: int = 5):
    """Optuna's RDB storage; commands that start together on a new database race to create
    its tables (a unique-key error in PostgreSQL), so a failed first try is tried again."""
    import random
    import warnings

    for attempt in range(tries):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # A heartbeat for shared databases only: the tune directory's own SQLite
                # file is locked by one command, which fails what a killed one left running
                # (under SQLite's write lock, late heartbeats failed live trials).
                beat = {} if url.startswith("sqlite") else {
                    "heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS}
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, **beat)
        except ImportError:
            raise
        except Exception as error:
            if attempt == tries - 1 or type(error).__name__ not in (
                    "IntegrityError", "ProgrammingError", "OperationalError"):
                raise
            time.sleep(0.5 + random.random())


class Pruning(Callback):
    """Reports the validation metric to the trial after each epoch and stops the fit after
    the epoch when the pruner says so.

    The pruner compares trials at the same step. With a fixed --epochs that is the epoch.
    Under --budget each trial plans its own number of epochs (a 2-minute trial of the small
    net runs 24 epochs, of a net four times wider 4), and epoch 2 of a 4-epoch one-cycle is
    further along its schedule than epoch 2 of 24: compared by epoch, the long schedules were
    pruned while their rate was still high (18 of 25 trials on Fashion-MNIST, every one of
    them the narrower nets). So a budget trial (``by_progress``) reports at tenths of its
    main fit's schedule instead, for each tenth the value it had there (that of the last
    epoch ended at or before it): a trial of few long epochs gains nothing by them."""

    order = 40

    def __init__(self, trial, metric: str, by_progress: bool = False) -> None:
        self.trial, self.metric, self.by_progress = trial, metric, by_progress
        self.pruned_at: int | None = None  # the epoch after which it stopped
        self.tenths = 0  # tenths of the schedule reported, by_progress
        self.previous: float | None = None  # the last epoch's value, by_progress

    def after_epoch(self, learner) -> None:
        value = learner.history[-1].get(self.metric)
        if value is None or not math.isfinite(value):
            return
        if self.by_progress:
            from ..train.budget import BudgetPlanner

            if not any(isinstance(c, BudgetPlanner) for c in learner.callbacks):
                return  # a phase before the main fit (a frozen body): not the budget's
            progress = learner.progress_at(learner.step)
            tenths = int(progress * 10 + 1e-9)
            previous, self.previous = self.previous, float(value)
            if tenths <= self.tenths:
                return
            for step in range(self.tenths + 1, tenths + 1):
                # the value the trial had at that point: this epoch's at its own end, else
                # the epoch's before (none before the first epoch ends)
                at = float(value) if step / 10 >= progress - 1e-9 else previous
                if at is not None:
                    self.trial.report(at, step)
            self.tenths = tenths
        else:
            self.trial.report(float(value), len(learner.history))
        if learner.epoch + 1 < learner.n_epochs and self.trial.should_prune():
            self.pruned_at = len(learner.history)
            learner.stop = True


@dataclass
class Search:
    """What every trial shares: the data, the options, the space and where runs go."""

    data: Any
    table: Table
    cfg: TuneConfig
    space: list[Parameter]
    tune_dir: Path
    metric: str
    deadline: float | None = None  # time.time() after which no trial starts
    n_trials: int = 20
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # marks this process's trials
    failures: list[str] = field(default_factory=list)  # this process's failures in a row

    def trial_options(self, params: dict) -> FitConfig:
        length = {} if self.cfg.budget else {"epochs": self.cfg.epochs}
        options = fit_options(self.cfg, **length, **with_augment_options(self.cfg, params),
                              progress=False, report=self.cfg.report,
                              runs_dir=str(self.tune_dir / "trials"))
        apply_recipe(options)
        return options

    def objective(self, trial) -> float:
        """One trial; its failures (one line each) are counted in a row for ``run``."""
        try:
            value = self._trial(trial)
        except ImagefitError as error:
            trial.set_user_attr("error", one_line(error))
            self.failures.append(one_line(error))
            _say(trial.number, f"failed: {one_line(error)}")
            raise
        self.failures.clear()
        return value

    def _trial(self, trial) -> float:
        import optuna

        params = {p.name: p.suggest(trial) for p in self.space}
        run_dir = self.tune_dir / "trials" / f"trial_{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("host", os.uname().nodename)
        trial.set_user_attr("worker", self.token)
        options = self.trial_options(params)
        pruning = Pruning(trial, self.metric, by_progress=bool(self.cfg.budget))
        started = time.perf_counter()
        try:
            result = run_fit(self.table, options, callbacks=[pruning], run_dir=run_dir,
                             budget=Budget.from_options(options))
        except FitInterrupted:
            raise KeyboardInterrupt from None  # Optuna marks the trial failed and stops
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        trial.set_user_attr("epochs", result.metrics.get("epochs"))
        value = result.metrics.get(self.metric)
        if pruning.pruned_at is not None:
            _say(trial.number, f"pruned after epoch {pruning.pruned_at} ({_params(params)})")
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at}")
        if value is None or not math.isfinite(value):
            raise ImagefitError(f"trial {trial.number}: its fit gave no {self.metric}")
        _say(trial.number, f"{self.metric} {value:.4f} ({_params(params)})")
        return float(value)

    def counted(self, study) -> int:
        """Trials that count towards --n-trials: finished, pruned and running."""
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.RUNNING)
        return len(study.get_trials(deepcopy=False, states=states))

    def run(self, study) -> None:
        """Trials one after another until the study holds ``n_trials`` or time is up; a
        failed trial does not count, but three in a row stop the search."""
        self.failures.clear()
        while self.counted(study) < self.n_trials:
            if self.deadline is not None and time.time() >= self.deadline:
                return
            study.optimize(self.objective, n_trials=1, catch=(ImagefitError,))
            if len(self.failures) >= FAILURES_IN_A_ROW:
                raise ImagefitError(f"{FAILURES_IN_A_ROW} trials in a row failed (the last: "
                                    f"{self.failures[-1]}): fix the options or the space")


def with_augment_options(cfg: FitConfig, params: dict) -> dict:
    """Searched values as fit options: single augmentation parameters (mixup, rotate, ...)
    go into ``augment_options``, over those the command gave."""
    augment = {k: v for k, v in params.items() if k in AugmentOptions.model_fields
               and k not in FitConfig.model_fields}
    if not augment:
        return dict(params)
    given = cfg.augment_options.model_dump(exclude_unset=True) if cfg.augment_options else {}
    rest = {k: v for k, v in params.items() if k not in augment}
    return {**rest, "augment_options": {**given, **augment}}


def _say(number: int, text: str) -> None:
    print(f"trial {number}: {text}", flush=True)


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


# -- the command --------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What ``tune`` returns: the tune directory, the trials' rows and the summary."""

    tune_dir: Path
    rows: list[dict]
    info: dict = field(default_factory=dict)

    @property
    def best(self) -> dict | None:
        return self.info.get("best")


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: the trials that finished are in ``result``'s files."""

    def __init__(self, result: TuneResult) -> None:
        super().__init__(f"interrupted after {len(result.rows)} trial(s)")
        self.result = result


def tune(data: str | Path | Table, config: TuneConfig | None = None,
         **options: Any) -> TuneResult:
    """Search the options of ``space`` for the best validation metric on ``data``; each
    trial a fit. Returns the tune directory's summary (see the module)."""
    cfg: TuneConfig = merge_options(TuneConfig, config, options)
    optuna = require_optuna()
    space = read_space(cfg.space) if cfg.space else None  # its mistakes before the data's
    table = data if isinstance(data, Table) else read_source(data, cfg)
    if space is None:
        space = default_space(table, cfg)
    names = {p.name for p in space}
    if cfg.budget and "epochs" in names:
        raise ImagefitError("--budget sets each trial's length: leave epochs out of the space")
    if cfg.workers > 1 and isinstance(data, Table):
        raise ImagefitError("--workers starts processes that read the data themselves: give "
                            "it as a folder, CSV file or builtin:NAME")
    if cfg.workers > 1:
        check_workers_room(cfg.workers)
    deadline = time.time() + parse_duration(cfg.timeout, "--timeout") if cfg.timeout \
        else None
    check_data(table, cfg)
    require_validation(table, cfg)
    metric = f"valid_{table.task.main_metric}"
    direction = "maximize" if HIGHER_IS_BETTER[table.task.main_metric] else "minimize"
    study_name = cfg.study or run_name(data)
    tune_dir = Path(cfg.runs_dir) / f"{folder_name(study_name)}_tune"
    new_folder = not tune_dir.exists()
    runs.output_folder(tune_dir, "--runs-dir")
    url = storage_url(cfg, tune_dir)
    search = Search(data, table, cfg, space, tune_dir, metric, deadline, cfg.n_trials)
    lock = runs.RunLock(tune_dir) if cfg.storage is None else None
    if lock is not None:
        lock.__enter__()  # one command at a time on a tune directory's own SQLite file
    try:
        try:
            study = open_study(optuna, url, study_name, direction, cfg)
        except ImagefitError:
            if new_folder:  # a storage that cannot be opened leaves no folder behind
                if lock is not None:
                    lock.__exit__(None, None, None)
                    lock = None
                shutil.rmtree(tune_dir, ignore_errors=True)
            raise
        if lock is not None:
            _fail_left_running(optuna, url, study)  # killed earlier: nobody else runs them
        runs.save_yaml(tune_dir / TUNE_SETUP, {
            "data": None if isinstance(data, Table) else str(data), "study": study_name,
            "storage": url if cfg.storage is None else None, "metric": metric,
            "direction": direction, "deadline": deadline,
            "space": {p.name: p.as_yaml() for p in space},
            "options": cfg.model_dump(exclude_unset=True)})
        if not study.get_trials(deepcopy=False) and (  # a new study starts from the defaults
                cfg.storage is None or claim(study, "imagefit_defaults", search.token) is None):
            study.enqueue_trial(default_trial(table, cfg, space))
        before = search.counted(study)
        print(f"tune: study {study_name} in {shown_url(url)}: {before} trial(s) so far, "
              f"{max(0, cfg.n_trials - before)} to go; {metric} to {direction}", flush=True)
        try:
            if cfg.workers == 1:
                search.run(study)
            else:
                _run_workers(tune_dir, cfg.workers, url)
        except KeyboardInterrupt:
            result = write_results(search, study, url)
            raise TuneInterrupted(result) from None
        result = write_results(search, study, url)
        if cfg.confirm and result.best is not None and confirms_here(optuna, study, search):
            try:
                confirmed = confirm(search, top_trials(study, CONFIRM_TOP), cfg.confirm)
            except BaseException:
                if cfg.storage is not None:  # give the refits back to the next command
                    study.set_user_attr(_claim_key(optuna, study), "")
                raise
            result = write_results(search, study, url, confirmed)
        return result
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _claim_key(optuna, study) -> str:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                    optuna.trial.TrialState.PRUNED))
    return f"imagefit_confirm_after_{len(done)}"


def confirms_here(optuna, study, search: Search) -> bool:
    """Whether this command refits the best trials (--confirm). On the tune directory's own
    study, yes. On a shared --storage, the last command to finish does, once: while other
    commands' trials run it leaves the refits to them, and of commands that finish together
    the one whose ``claim`` stands."""
    if search.cfg.storage is None:
        return True
    optuna.storages.fail_stale_trials(study)  # a killed command's trials, past the grace
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        print(f"tune: {len(running)} trial(s) of other commands still running: the last "
              "command to finish refits the best (--confirm)", flush=True)
        return False
    holder = claim(study, _claim_key(optuna, study), search.token)
    if holder is not None:
        where = (holder or "another host").split()[0]
        print(f"tune: the command on {where} refits the best trials of this study "
              "(--confirm); this command's best.yaml holds the search's best trial",
              flush=True)
        return False
    return True


def claim(study, key: str, token: str) -> str | None:
    """Takes ``key`` in the study's attributes for this command, once among all the commands
    on the study: None when this command holds it, else the holder ("HOST pid N ...").
    Commands that claim together each write and read back after a second: the last writer
    holds it (a write that read the key empty lands within that second)."""
    me = f"{os.uname().nodename} pid {os.getpid()} {token}"
    holder = study.user_attrs.get(key)
    if not holder:
        try:
            study.set_user_attr(key, me)
        except Exception:  # another command's claim went in at the same moment
            pass
        time.sleep(1.0)
        holder = study.user_attrs.get(key)
    return None if holder == me else holder


def _fail_left_running(optuna, url: str, study) -> None:
    """Trials a killed command left running: failed (this command holds the tune
    directory's lock, so no one else runs them)."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return
    storage = optuna.storages.get_storage(url)
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in running:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        print(f"tune: trial {trial.number} was left running by a command that stopped: "
              "marked failed", flush=True)


def _run_workers(tune_dir: Path, workers: int, url: str) -> None:
    """``workers`` processes on the same study, each with its share of the cores; they die
    with this process, and Ctrl-C reaches them too."""
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "IMAGEFIT_TUNE_STORAGE": url}
    preexec = distributed.child_dies_with_this_process()
    processes = [subprocess.Popen([sys.executable, "-m", "imagefit.workflows.tune",
                                   str(tune_dir), str(k)], env=env, preexec_fn=preexec)
                 for k in range(workers)]
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait()
    if any(code == 130 for code in codes):
        raise KeyboardInterrupt
    failed = [code for code in codes if code]
    if failed:
        raise ImagefitError(f"{len(failed)} of the {workers} workers failed (exit status "
                            f"{failed[0]}; their messages are above): run tune again to "
                            "continue the study")


def work(tune_dir: Path, worker: int) -> int:
    """One worker process: the search ``tune`` set up in ``tune_dir``."""
    optuna = require_optuna()
    setup = yaml.safe_load((tune_dir / TUNE_SETUP).read_text())
    cfg = make_options(TuneConfig, setup["options"])
    space = parse_space(setup["space"], str(tune_dir / TUNE_SETUP))
    table = read_source(setup["data"], cfg)
    url = os.environ.get("IMAGEFIT_TUNE_STORAGE") or setup["storage"]
    study = open_study(optuna, url, setup["study"], setup["direction"], cfg, worker + 1)
    search = Search(setup["data"], table, cfg, space, tune_dir, setup["metric"],
                    setup["deadline"], cfg.n_trials)
    if worker > 0:
        _leave_the_queue_to_the_first_worker(optuna, study)
    try:
        search.run(study)
    except KeyboardInterrupt:
        return 130
    return 0


def _leave_the_queue_to_the_first_worker(optuna, study, seconds: float = 120.0) -> None:
    """Waits (at most ``seconds``) while the study holds queued trials (the defaults' trial
    of a new study): SQLite has no row locks, so two workers that ask at the same moment
    could both take the one queued trial and run it twice (seen once in CI: the second
    worker's tell then failed on a finished trial)."""
    waiting = (optuna.trial.TrialState.WAITING,)
    deadline = time.monotonic() + seconds
    while study.get_trials(deepcopy=False, states=waiting) and time.monotonic() < deadline:
        time.sleep(0.2)


# -- results ------------------------------------------------------------------------------


def trial_rows(study) -> list[dict]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        rows.append({"number": trial.number, "state": trial.state.name.lower(), "value": value,
                     "epochs": attrs.get("epochs") or len(trial.intermediate_values),
                     "reports": len(trial.intermediate_values),  # epochs, or tenths
                     "seconds": attrs.get("seconds"), **{f"param_{k}": v for k, v in
                                                         trial.params.items()},
                     "run_dir": attrs.get("run_dir"), "host": attrs.get("host"),
                     "error": attrs.get("error")})
    return rows


def top_trials(study, count: int) -> list[dict]:
    """The ``count`` best finished trials, best first."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    return [{"number": t.number, "value": t.value, "params": t.params} for t in done[:count]]


def write_results(search: Search, study, url: str, confirmed: dict | None = None
                  ) -> TuneResult:
    """tune.csv, tune.json, best.yaml, the plots and tune.html for the trials so far."""
    import pandas as pd

    from ..report.tune_page import write_tune_page

    rows = trial_rows(study)
    done = [r for r in rows if r["state"] == "complete"]
    pruned = sum(r["state"] == "pruned" for r in rows)
    info: dict[str, Any] = {
        "study": study.study_name, "storage": shown_url(url), "metric": search.metric,
        "direction": study.direction.name.lower(), "n_trials": len(rows),
        "complete": len(done), "pruned": pruned,
        "failed": sum(r["state"] == "fail" for r in rows),
        "pruned_share": round(pruned / max(1, len(done) + pruned), 3),
        "space": {p.name: p.as_yaml() for p in search.space},
    }
    best_yaml = None
    if done:
        best = study.best_trial
        info["best"] = {"number": best.number, "value": best.value, "params": best.params,
                        "run_dir": best.user_attrs.get("run_dir")}
        best_yaml = {"data": None if isinstance(search.data, Table) else str(search.data),
                     **search.cfg.model_dump(exclude_unset=True,
                                             exclude=set(TuneConfig.model_fields)
                                             - set(FitConfig.model_fields)),
                     **with_augment_options(search.cfg, confirmed["chosen_params"]
                                            if confirmed else best.params)}
        for where in ("runs_dir", "name", "progress", "report"):  # the refit's own
            best_yaml.pop(where, None)
    if confirmed:
        info["confirm"] = confirmed
    with runs.interrupts_deferred():
        runs.write_atomic(search.tune_dir / TUNE_TABLE, pd.DataFrame(rows).to_csv(index=False))
        runs.save_json(search.tune_dir / TUNE_INFO, {**info, "rows": rows})
        if best_yaml is not None:
            runs.save_yaml(search.tune_dir / BEST, best_yaml)
    write_tune_page(search.tune_dir, study, info, rows)
    return TuneResult(search.tune_dir, rows, info)


def confirm(search: Search, candidates: list[dict], seeds: int) -> dict:
    """The top trials' options (``candidates``: number, value, params) and the defaults,
    fitted again on ``seeds`` fresh seeds each (other validation splits and starts than the
    search's own): per seed and median. The candidate with the best median is ``chosen``
    (best.yaml): the search's top trial often owes part of its figure to its one split."""
    higher = HIGHER_IS_BETTER[search.metric.removeprefix("valid_")]
    seed_list = [search.cfg.seed + 1 + k for k in range(seeds)]
    entries = [{"label": "defaults", "number": None, "params": {}}] + [
        {"label": f"trial {c['number']}", "number": c["number"], "params": c["params"],
         "search_value": c["value"]} for c in candidates]
    default_params = default_trial(search.table, search.cfg, search.space)
    for entry in entries:
        if entry["number"] is not None and entry["params"] == default_params:
            entry["values"] = list(entries[0]["values"])  # the defaults' trial: refitted
            entry["median"] = entries[0]["median"]
            print(f"confirm: {entry['label']} holds the defaults: their refits count for it",
                  flush=True)
            continue
        entry["values"] = []
        for seed in seed_list:
            options = search.trial_options({**entry["params"], "seed": seed})
            folder = "defaults" if entry["number"] is None else f"trial_{entry['number']:04d}"
            run_dir = search.tune_dir / "confirm" / f"{folder}_seed{seed}"
            if run_dir.exists():
                runs.remove_run_dir(run_dir)
            result = run_fit(search.table, options, run_dir=run_dir,
                             budget=Budget.from_options(options))
            entry["values"].append(result.metrics.get(search.metric))
            print(f"confirm: {entry['label']}, seed {seed}: {search.metric} "
                  f"{entry['values'][-1]:.4f}", flush=True)
        entry["median"] = statistics.median(entry["values"])
    ranked = sorted(entries[1:], key=lambda e: (-e["median"] if higher else e["median"],
                                                -e["search_value"] if higher
                                                else e["search_value"]))
    chosen, defaults = ranked[0], entries[0]
    better = chosen["median"] > defaults["median"] if higher else \
        chosen["median"] < defaults["median"]
    return {"seeds": seed_list, "entries": entries, "chosen": chosen["number"],
            "chosen_params": chosen["params"], "median_chosen": chosen["median"],
            "median_defaults": defaults["median"], "chosen_beats_defaults": bool(better)}


def format_tune(result: TuneResult) -> str:
    info = result.info
    lines = [f"{info['n_trials']} trials: {info['complete']} finished, {info['pruned']} pruned "
             f"({info['pruned_share']:.0%}), {info['failed']} failed"]
    if result.best:
        best = result.best
        lines.append(f"best: trial {best['number']}, {info['metric']} {best['value']:.4f} "
                     f"({_params(best['params'])})")
    if "confirm" in info:
        c = info["confirm"]
        lines.append(f"refitted on seeds {', '.join(map(str, c['seeds']))}: median "
                     f"{info['metric']} {c['median_chosen']:.4f} with trial {c['chosen']}'s "
                     f"options (best.yaml), {c['median_defaults']:.4f} with the defaults")
    return "\n".join(lines)


if __name__ == "__main__":  # a worker that tune started: python -m imagefit.workflows.tune
    distributed.exit_if_parent_gone()
    sys.exit(work(Path(sys.argv[1]), int(sys.argv[2])))
