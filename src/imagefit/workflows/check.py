"""``imagefit check``: is the data sound, and can the pipeline learn, before hours of
training? The data checks (duplicates and leakage, labels, statistics) are in
``data/audit.py``; the two that train are here: one batch must be overfitted by the chosen
model and optimizer, and a short fit on shuffled labels must stay at chance. The verdicts go
to the terminal, check.json and check.html; the rules are in docs/CHECKS.md."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import runs
from ..config import CheckConfig, FitConfig
from ..data import audit, audit_images
from ..data.audit import Finding
from ..data.duplicates import training_copies
from ..data.loader import Loader
from ..data.prepare import measure_channels
from ..data.table import SPLITS, Table
from ..devices import resolve_device, resolve_precision
from ..errors import ImagefitError
from ..forward import loader_outputs, run_model
from ..metrics import all_metrics
from ..tasks import Task
from ..train.optim import make_optimizer
from ..train.step import training_step
from .build import TrainingParts, build_training
from .loading import LoadedData, load_data, require_images

OVERFIT_STEPS = 100
OVERFIT_BATCH = 32  # images in the batch to overfit
OVERFIT_GOAL = 0.05  # its loss must fall below this share of its first value
SWEEP_RATES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # tried on the batch when it fails
FROZEN_SHARE = 0.5  # of the parameters: when more are frozen, that is the likely cause
CHANCE_SIGMAS = 3.0
CHANCE_MARGIN = 0.02
SHOWN_NAMES = 5  # tensors named when some get no gradient


@dataclass
class CheckResult:
    """The verdicts of ``check``, where they were written, and whether any failed."""

    check_dir: Path | None
    findings: list[Finding]
    seconds: float = 0.0
    pairs: list = field(default_factory=list)

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "fail"]


def check(data: str | Path | Table, cfg: CheckConfig, write: bool = True) -> CheckResult:
    """Every check of ``data`` with the model and options a fit would use; writes
    check.json, check.html and pairs.png into a new folder of --runs-dir."""
    started = time.perf_counter()
    cfg = cfg.model_copy()
    loaded, parts, device = _assemble(data, cfg)
    rows = {"train": loaded.train_rows, "valid": loaded.valid_rows, "test": loaded.test_rows}
    table, cache = loaded.table, loaded.prepared.cache
    findings: list[Finding] = []
    say = _printer(cfg.progress)
    say("duplicates")
    found, pairs = audit.duplicates(table, cache, rows, hamming=cfg.near_hamming,
                                    pixel_diff=cfg.near_pixels)
    findings += found
    say("labels")
    findings += audit.label_balance(table, loaded.train_rows, cfg.folds,
                                    "folds" in cfg.model_fields_set, cfg.min_class_count)
    findings += audit.regression_targets(table, np.concatenate(list(rows.values())))
    findings.append(audit.label_in_pixels(table, cache, loaded.train_rows, loaded.valid_rows,
                                          cfg.seed))
    say("statistics")
    mean, std = measure_channels(cache.images, loaded.train_rows, cfg.seed)
    findings += audit_images.image_statistics(table, cache, loaded.train_rows, mean, std,
                                       cfg.normalize)
    say("one batch")
    precision = resolve_precision(cfg.precision, device)
    findings.append(overfit_one_batch(cfg, loaded, parts, precision, cfg.overfit_steps))
    say("shuffled labels")
    findings.append(shuffled_labels(cfg, loaded, parts, precision))
    result = CheckResult(None, findings, time.perf_counter() - started, pairs["pairs"])
    if write:
        result.check_dir = write_check(data, cfg, result, table, cache, rows)
    return result


def fast_checks(cfg: FitConfig, loaded: LoadedData, parts: TrainingParts,
                precision: str) -> list[Finding]:
    """The checks of ``fit --check``: those that take seconds (no shuffled-label fit, no
    near-duplicate search)."""
    table, cache = loaded.table, loaded.prepared.cache
    rows = {"train": loaded.train_rows, "valid": loaded.valid_rows, "test": loaded.test_rows}
    split_of = audit.split_labels(len(table), rows)
    leaked = {s: len(r) for s, r in training_copies(cache.content_hashes(), split_of).items()}
    findings = [audit.leak_finding(leaked, rows)]
    findings += [f for f in audit.label_balance(table, loaded.train_rows, 2, False)
                 if f.check != "folds"]
    findings += audit.regression_targets(table, np.concatenate(list(rows.values())))
    findings += [audit_images.unreadable_files(table, cache),
                 audit_images.constant_images(table, cache)]
    findings.append(overfit_one_batch(cfg, loaded, parts, precision))
    return findings


def _assemble(data, cfg: CheckConfig) -> tuple[LoadedData, TrainingParts, torch.device]:
    """The data and the model a fit would use, without augmentation or label smoothing
    (the checks measure the model, not the regularization)."""
    if cfg.lr == "auto":
        raise ImagefitError("option --lr: the check trains at the rate a fit would use; give "
                            "a number (the one batch's sweep suggests one when it fails)")
    for name, value in (("augment", "none"), ("augment_options", None),
                        ("label_smoothing", 0.0)):
        setattr(cfg, name, value)
    device = resolve_device(cfg.device)
    loaded = load_data(data, cfg)
    require_images(loaded, "imagefit check")
    parts = build_training(cfg, loaded, device)
    return loaded, parts, device


def _printer(progress: bool):
    started = time.perf_counter()

    def say(step: str) -> None:
        if progress:
            print(f"check: {step} ({time.perf_counter() - started:.0f} s)", flush=True)
    return say


# ---- the checks that train ----

def _train(model: nn.Module, task: Task, batches, optimizer, steps: int,
           precision: str, grad_clip: float = 0.0) -> list[float]:
    """Train ``steps`` steps on ``batches`` (an iterator of normalized x, encoded y) as the
    fit's steps are (``train.step.training_step``: its autocast, memory format and gradient
    clipping); the losses, up to the first that is not finite."""
    losses = []
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        loss = training_step(model, x, y, task.loss, optimizer, precision=precision,
                             grad_clip=grad_clip, skip_non_finite=True)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
    return losses


def _ratio(losses: list[float]) -> float:
    """The lowest of the last 10 losses over the first; infinite when the loss broke."""
    if not math.isfinite(losses[-1]) or not losses[0] > 0:
        return math.inf
    return min(losses[-10:]) / losses[0]


def _share(last: float, first: float) -> str:
    if math.isfinite(last) and first > 0:
        return f"the loss ends at {last / first:.1%} of its start"
    return "the loss became NaN"


def _repeat(x, y):
    while True:
        yield x, y


def overfit_one_batch(cfg: FitConfig, loaded: LoadedData, parts: TrainingParts,
                      precision: str, steps: int = OVERFIT_STEPS) -> Finding:
    """Train the chosen model with the chosen optimizer and rate on one batch, without
    augmentation; its loss must fall under 5% of its first value. When it does not, the
    evidence for the likely causes: a NaN loss, frozen parameters or ones without gradient,
    labels that do not vary, or a rate the sweep on the batch finds too low or too high."""
    name = "one batch"
    rng = np.random.default_rng(cfg.seed)
    train_rows = loaded.train_rows
    rows = np.sort(rng.choice(train_rows, min(OVERFIT_BATCH, len(train_rows)), replace=False))
    device = next(parts.model.parameters(), torch.zeros(0)).device
    task = copy.copy(parts.task)
    task.label_smoothing = 0.0  # its floor is well above zero: one batch is fitted exactly
    images = torch.from_numpy(loaded.prepared.cache.images[rows]).permute(0, 3, 1, 2)
    x = parts.pipeline(images.to(device))
    y = task.encode_targets(loaded.table.targets)[torch.from_numpy(rows)].to(device)
    lr = float(cfg.lr) * parts.lr_factor
    initial = copy.deepcopy(parts.model.state_dict())

    def attempt(rate: float, n: int) -> tuple[list[float], nn.Module]:
        model = copy.deepcopy(parts.model)
        model.load_state_dict(initial)
        optimizer = make_optimizer(model, cfg.opt, rate, cfg.wd)
        return _train(model, task, _repeat(x, y), optimizer, n, precision,
                      cfg.grad_clip or 0.0), model

    trainable = [p for p in parts.model.parameters() if p.requires_grad]
    if not trainable:
        total = sum(p.numel() for p in parts.model.parameters())
        return Finding(name, "fail", f"no step taken: all {total:,} parameters are frozen",
                       f"{total:,} of {total:,} parameters are frozen (requires_grad False): "
                       "unfreeze the model", {"frozen": total, "parameters": total})
    losses, model = attempt(lr, steps)
    details = {"images": len(rows), "steps": steps, "lr": lr, "optimizer": cfg.opt,
               "losses": [round(v, 5) for v in losses[:: max(1, steps // 50)]]}
    first = losses[0]
    last = min(losses[-10:]) if math.isfinite(losses[-1]) else math.nan
    if _ratio(losses) <= OVERFIT_GOAL:
        details.update(first=first, last=last)
        return Finding(name, "pass", f"loss {first:.3g} -> {last:.3g} in {len(losses)} steps "
                       f"(under {OVERFIT_GOAL:.0%} of its start)", "", details)
    causes = []
    total = sum(p.numel() for p in model.parameters())
    frozen = total - sum(p.numel() for p in model.parameters() if p.requires_grad)
    details.update(first=first, last=last, frozen=frozen, parameters=total)
    if not math.isfinite(losses[-1]):
        causes.append(f"the loss became NaN or infinite at step {len(losses)}: the rate is too "
                      "high or the inputs hold extreme values")
    if total and frozen / total > FROZEN_SHARE:
        causes.append(f"{frozen:,} of {total:,} parameters are frozen (requires_grad False): "
                      "unfreeze the model (the fit trains what is unfrozen)")
    dead = _without_gradient(model, task, x, y, precision)
    if not bool((x != x.flatten()[0]).any()):  # e.g. all black: so the weights get no gradient
        details["input_std"] = 0.0
        causes.append("the images have no variation (std 0: every pixel of the batch has the "
                      "same value), so there is nothing to learn from them: check that the "
                      "images are not blank")
    elif dead:
        details["without_gradient"] = dead[:SHOWN_NAMES]
        causes.append(f"{len(dead)} trainable tensor(s) get no gradient (e.g. {dead[0]}): "
                      "they are not used by the forward pass or are cut off from the loss")
    if task.single_label and len(torch.unique(y)) < 2:
        causes.append("every image of the batch has the same label: the labels do not vary")
    causes += _rate_swept(lambda rate: _ratio(attempt(rate, steps)[0]), lr, details,
                          _share(last, first))
    result = f"loss {first:.3g} -> {last:.3g} in {len(losses)} steps at lr {lr:.3g}"
    if not causes:
        return Finding(name, "fail", result, "no single cause found: the model may be too "
                       "small for the task, or every rate of the sweep (1e-5 to 1) fails too; "
                       "try another --model or --opt", details)
    details["causes"] = causes
    return Finding(name, "fail", result, "; ".join(causes), details)




def _rate_swept(ratio_at: Callable[[float], float], lr: float, details: dict,
                share: str) -> list[str]:
    """The one-batch fit again at each rate of ``SWEEP_RATES`` half a decade or more from
    ``lr`` (``ratio_at``: its last loss over its first): the cause when the batch fits only
    above or only below ``lr``. The sweep goes into ``details``."""
    sweep = {rate: ratio_at(rate) for rate in SWEEP_RATES if abs(math.log10(rate / lr)) >= 0.5}
    details["sweep"] = {f"{rate:.0e}": ratio for rate, ratio in sweep.items()}
    fitted = sorted(rate for rate, ratio in sweep.items() if ratio <= OVERFIT_GOAL)
    if not fitted or fitted[0] <= lr <= fitted[-1]:
        return []
    direction = "too low" if fitted[0] > lr else "too high"
    span = f"{fitted[0]:.0e}" if len(fitted) == 1 else f"{fitted[0]:.0e} to {fitted[-1]:.0e}"
    return [f"the rate is {direction}: the sweep on this batch fits it at {span} (at "
            f"{lr:.3g} {share}); give a --lr in that range, or --lr auto"]


def _without_gradient(model: nn.Module, task: Task, x, y, precision: str) -> list[str]:
    """Trainable parameters whose gradient is missing or zero after one backward pass."""
    model.zero_grad(set_to_none=True)
    loss = task.loss(run_model(model, x, precision), y)
    if not torch.isfinite(loss):
        return []
    loss.backward()
    return [name for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum()))]


def shuffled_labels(cfg: FitConfig, loaded: LoadedData, parts: TrainingParts,
                    precision: str) -> Finding:
    """Train a fresh copy of the model for ``sanity_steps`` steps on the training labels
    shuffled among the training images; on validation against the true labels it must stay
    at chance. Above chance, the labels reach the model by another path than the targets."""
    name = "shuffled labels"
    valid_loader = parts.loaders["valid"]
    if valid_loader is None:
        return Finding(name, "skip", "no validation rows (give --valid-pct above 0)")
    if not any(p.requires_grad for p in parts.model.parameters()):
        return Finding(name, "skip", "no trainable parameters (see one batch)")
    table, task = loaded.table, parts.task
    targets = task.encode_targets(table.targets)
    train_rows = loaded.train_rows
    shuffled = targets.clone()
    order = np.random.default_rng(cfg.seed).permutation(len(train_rows))
    shuffled[torch.from_numpy(train_rows)] = targets[torch.from_numpy(train_rows[order])]
    device = valid_loader.device
    loader = Loader(loaded.prepared.cache.tensor(), shuffled, train_rows, parts.batch_size,
                    shuffle=True, drop_last=len(train_rows) > parts.batch_size, seed=cfg.seed,
                    device=device)
    model = copy.deepcopy(parts.model)
    optimizer = make_optimizer(model, cfg.opt, float(cfg.lr) * parts.lr_factor, cfg.wd)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for xb, yb in loader:
                yield parts.pipeline(xb), yb
            epoch += 1

    losses = _train(model, task, batches(), optimizer, cfg.sanity_steps, precision,
                    cfg.grad_clip or 0.0)
    out = loader_outputs(model, parts.pipeline, task, valid_loader, precision=precision)
    n = len(loaded.valid_rows)
    details = {"steps": len(losses), "valid_images": n, "final_train_loss": losses[-1]}
    if not task.has_classes:
        score = all_metrics(task, out["outputs"], out["targets"])["r2"]
        chance, label = 0.0, "R2"
        bound = chance + 0.1
    elif task.multi_label:
        valid_y = out["targets"].numpy() > 0.5
        share = valid_y.mean(0)
        score = float(((task.activate(out["outputs"]).numpy() > 0.5) == valid_y).mean())
        chance, label = float(np.maximum(share, 1 - share).mean()), "label accuracy"
        bound = chance + CHANCE_SIGMAS * math.sqrt(chance * (1 - chance) / (n * valid_y.shape[1])
                                                    ) + CHANCE_MARGIN
    else:
        counts = np.bincount(out["targets"].numpy().astype(np.int64), minlength=task.n_out)
        chance, label = float(counts.max() / max(n, 1)), "accuracy"
        score = float((out["outputs"].argmax(1) == out["targets"]).float().mean())
        bound = chance + CHANCE_SIGMAS * math.sqrt(chance * (1 - chance) / max(n, 1)) + \
            CHANCE_MARGIN
    details.update(score=score, chance=chance, bound=bound, metric=label)
    text = (f"validation {label} {score:.3f} after {len(losses)} steps on shuffled labels "
            f"(chance {chance:.3f}, limit {bound:.3f})")
    if not math.isfinite(losses[-1]):
        return Finding(name, "fail", text + "; the loss became NaN", "lower --lr", details)
    if score > bound:
        return Finding(name, "fail", text, "the labels reach the model by another path than "
                       "the training targets: validation images that copy training ones, or "
                       "labels read from the images' files or order", details)
    return Finding(name, "pass", text, "", details)


# ---- output ----

STATUS_ORDER = {"fail": 0, "warn": 1, "pass": 2, "skip": 3}


def format_check(result: CheckResult) -> str:
    """The verdict table: check | result | what to do."""
    width = max(len(f.check) for f in result.findings)
    lines = [f"{'check':<{width}}  {'result':<6}  what to do / measured"]
    for f in result.findings:
        lines.append(f"{f.check:<{width}}  {f.status:<6}  {f.advice or f.result}")
        if f.advice:
            lines.append(f"{'':<{width}}  {'':<6}  ({f.result})")
    failed = result.failed
    warned = sum(f.status == "warn" for f in result.findings)
    lines.append(f"{len(failed)} failed, {warned} warned, "
                 f"{sum(f.status == 'pass' for f in result.findings)} passed in "
                 f"{result.seconds:.0f} s")
    return "\n".join(lines)


def write_check(data, cfg: CheckConfig, result: CheckResult, table: Table, cache,
                rows: dict) -> Path:
    """check.json, pairs.png (the closest near-duplicate pairs across splits) and
    check.html in a new folder."""
    from ..report.check_page import save_pairs, write_check_page

    name = cfg.name or (table.description if isinstance(data, Table) else
                        Path(str(data).removeprefix("builtin:")).stem)
    check_dir = runs.new_run_dir(Path(cfg.runs_dir), f"check-{name}")
    split_of = audit.split_labels(len(table), rows)
    pairs = [{"first": _label(table, a, split_of), "second": _label(table, b, split_of),
              "pixel_diff": round(d, 3)} for a, b, d in result.pairs]
    summary = {"data": str(data) if not isinstance(data, Table) else table.description,
               "seconds": round(result.seconds, 2),
               "failed": [f.check for f in result.failed],
               "checks": [f.to_dict() for f in result.findings], "pairs": pairs}
    runs.save_json(check_dir / "check.json", summary)
    if result.pairs:
        save_pairs(cache.images, result.pairs, [p["first"] for p in pairs],
                   [p["second"] for p in pairs], check_dir / "pairs.png")
    write_check_page(check_dir, summary)
    return check_dir


def _label(table: Table, row: int, split_of) -> str:
    where = table.paths[row] if table.paths is not None else f"row {row}"
    return f"{SPLITS[split_of[row]]}: {where}"
