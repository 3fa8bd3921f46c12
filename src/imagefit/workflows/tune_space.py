"""The search space of ``imagefit tune``: parameters read from a YAML file (or the defaults
for the data's task), checked before any data is read, and the default trial that tries the
options a plain fit would take."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    AugmentOptions,
    FitConfig,
    SourceOptions,
    fit_options,
    make_options,
)
from ..data.inputs import table_input
from ..data.prepare import resolve_settings
from ..data.table import Table
from ..errors import ImagefitError
from ..models import SMALL_CNN_WIDTHS, check_model_name, default_model_name
from .recipes import apply_recipe, apply_small_image_recipe, choose_photo_weights

SPACE_KINDS = ("float", "log-float", "int", "log-int", "categorical")
SPEC_KEYS = {"type", "low", "high", "step", "choices"}

# Options that say where and how a fit runs, not what it learns: not searched.
NOT_SEARCHED = set(SourceOptions.model_fields) | {
    "runs_dir", "name", "progress", "report", "device", "devices", "cache_dir", "check",
    "budget", "test_every_epoch", "metrics", "find_label_issues", "drop_rows", "relabel",
    "top", "min_score"}
ALIASES = {"learning_rate": "lr", "weight_decay": "wd", "batch_size": "bs",
           "architecture": "model", "n_epochs": "epochs"}


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
