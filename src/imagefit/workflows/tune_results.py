"""What ``imagefit tune`` leaves: tune.csv and tune.json (a row per trial), best.yaml (the
best trial's options, or those the refits chose), Optuna's plots and tune.html; and the
summary printed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runs
from ..config import FitConfig, TuneConfig
from ..data.table import Table
from .tune_space import with_augment_options

TUNE_SETUP, TUNE_INFO, TUNE_TABLE, BEST = "tune.yaml", "tune.json", "tune.csv", "best.yaml"


@dataclass
class TuneResult:
    """What ``tune`` returns: the tune directory, the trials' rows and the summary."""

    tune_dir: Path
    rows: list[dict]
    info: dict = field(default_factory=dict)

    @property
    def best(self) -> dict | None:
        return self.info.get("best")


def shown_url(url: str) -> str:
    """A storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: Optuna will say so
        return url


def format_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


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


def write_results(search: Any, study, url: str, confirmed: dict | None = None
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


def format_tune(result: TuneResult) -> str:
    info = result.info
    lines = [f"{info['n_trials']} trials: {info['complete']} finished, {info['pruned']} pruned "
             f"({info['pruned_share']:.0%}), {info['failed']} failed"]
    if result.best:
        best = result.best
        lines.append(f"best: trial {best['number']}, {info['metric']} {best['value']:.4f} "
                     f"({format_params(best['params'])})")
    if "confirm" in info:
        c = info["confirm"]
        lines.append(f"refitted on seeds {', '.join(map(str, c['seeds']))}: median "
                     f"{info['metric']} {c['median_chosen']:.4f} with trial {c['chosen']}'s "
                     f"options (best.yaml), {c['median_defaults']:.4f} with the defaults")
    return "\n".join(lines)
