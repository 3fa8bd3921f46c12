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
    FitConfig,
    TuneConfig,
    fit_options,
    make_options,
    merge_options,
)
from ..data.sources import read_source
from ..data.table import Table
from ..errors import FitInterrupted, ImagefitError
from ..tasks import HIGHER_IS_BETTER
from ..train.budget import Budget, parse_duration
from ..train.callbacks import Callback
from .fit import run_fit, run_name
from .loading import check_data
from .preflight import check_workers_room
from .recipes import apply_recipe
from .sweep import folder_name, one_line, require_validation
from .tune_results import (
    TUNE_SETUP,
    TuneResult,
    format_params,
    shown_url,
    top_trials,
    write_results,
)
from .tune_space import (
    Parameter,
    default_space,
    default_trial,
    parse_space,
    read_space,
    with_augment_options,
)

MISSING = "tune needs optuna: pip install 'imagefit[tune]' (or pip install optuna)"
STUDY_FILE = "study.db"
FAILURES_IN_A_ROW = 3
CONFIRM_TOP = 3  # trials refitted by --confirm
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 60


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ImagefitError(MISSING) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's line is ours
    return optuna


# -- the study ----------------------------------------------------------------------------


def storage_url(cfg: TuneConfig, tune_dir: Path) -> str:
    return cfg.storage or f"sqlite:///{(tune_dir / STUDY_FILE).resolve()}"


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
            _say(trial.number, f"pruned after epoch {pruning.pruned_at} ({format_params(params)})")
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at}")
        if value is None or not math.isfinite(value):
            raise ImagefitError(f"trial {trial.number}: its fit gave no {self.metric}")
        _say(trial.number, f"{self.metric} {value:.4f} ({format_params(params)})")
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


def _say(number: int, text: str) -> None:
    print(f"trial {number}: {text}", flush=True)


# -- the command --------------------------------------------------------------------------


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


if __name__ == "__main__":  # a worker that tune started: python -m imagefit.workflows.tune
    distributed.exit_if_parent_gone()
    sys.exit(work(Path(sys.argv[1]), int(sys.argv[2])))
