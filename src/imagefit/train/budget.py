"""``--budget``: fit the training into a wall-clock budget.

The budget runs from the command's start to its run directory being complete, final
evaluation and report included (building the image cache the first time is not counted).
The planner measures the training steps and a forward pass over the first steps of the fit,
then chooses how many steps (and so epochs, the last one possibly partial) fit in what is
left once the per-epoch validation and the final evaluation are paid for, and lays the
schedule over exactly those steps. After every epoch it plans again from the times measured
so far, keeping the schedule continuous, so a slow start or a busy machine is corrected
for; if training still runs past its end, it stops there and the run is completed as usual.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import distributed
from ..errors import ImagefitError
from ..forward import run_model
from .callbacks.base import Callback

_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*(h|m|s)", re.IGNORECASE)
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}

# Seconds the end of a fit takes beyond evaluating the final model: interpretation plots,
# Grad-CAM of the top losses, the report and saving (measured: 2-3 s on 2 cores for
# Fashion-MNIST with the small-image recipe).
FINAL_FIXED_SECONDS = 4.0
# The interpreter's exit after the run directory is complete (freeing torch and its
# threads): bench/time_to_accuracy.py's 10-minute runs exited 1.9-2.7 s after their run
# directories were complete, up to 2.5 s past the budget, before this was reserved.
EXIT_SECONDS = 3.0
# Steps timed before the first plan, after the warm-up steps (which allocate and compile).
WARMUP_STEPS = 5
TIMED_STEPS = 20
# The smallest plan worth running; a budget that leaves less is an error.
MIN_STEPS = 10
SAFETY = 0.97  # of the time left that the plan fills: timing noise must not overrun it
# The final evaluation, timed on a sample, took up to 1.25x as long over the whole splits
# (bench/recipe_ablation.py: small_cnn's end ran 0.6 s past a 1 min budget without it).
EVAL_MARGIN = 1.25

_command_started: float | None = None


def parse_duration(text: str | float | int, option: str = "--budget") -> float:
    """Seconds in a duration such as '90s', '10m', '2h' or '1h30m' (a bare number: seconds),
    given as ``option``."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        spelled = str(text).strip()
        try:
            seconds = float(spelled)
        except ValueError:
            parts = _DURATION.findall(spelled)
            if not parts or _DURATION.sub("", spelled).strip():
                raise ImagefitError(f"option {option}: '{text}' is not a duration; write it "
                                    "like 90s, 10m, 2h or 1h30m") from None
            seconds = sum(float(value) * _UNITS[unit.lower()] for value, unit in parts)
    if not 0 < seconds < math.inf:
        raise ImagefitError(f"option {option}: '{text}' must be a finite time longer than 0 s")
    return seconds


def format_duration(seconds: float) -> str:
    return f"{seconds / 60:.3g} min" if seconds >= 120 else f"{seconds:.3g} s"


def process_age() -> float:
    """Seconds since this process started (0 where /proc does not say)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def mark_command_start(process: bool = True, now: float | None = None) -> None:
    """The command's start, from which a budget counts: the process's start (interpreter and
    imports included) for ``imagefit`` run from a shell, else ``now`` (default: now), a
    ``time.monotonic`` reading."""
    global _command_started
    if process:
        _command_started = time.monotonic() - process_age()
    else:
        _command_started = time.monotonic() if now is None else now


def command_start() -> float:
    """When the budget's clock started: the command's start (taken once), or now when called
    from Python."""
    global _command_started
    started, _command_started = _command_started, None
    return started if started is not None else time.monotonic()


@dataclass
class Budget:
    """A --budget's clock, which fit and cv both ask: when the command started and must end
    (``time.monotonic`` readings) and the seconds not counted against it (building the image
    cache the first time). A CV hands each fit a ``share`` of what is left."""

    text: str
    started: float
    end: float
    not_counted: float = 0.0

    @classmethod
    def from_options(cls, options) -> Budget | None:
        """The budget ``options`` ask for (None without one), after checking that the other
        options go with a budget. The command's start is taken first, so that an error here
        does not leave it for the next command in the process."""
        if not options.budget:
            return None
        started = command_start()
        seconds = parse_duration(options.budget)
        if "epochs" in options.model_fields_set:
            raise ImagefitError(f"--epochs {options.epochs} and --budget {options.budget} both "
                                "set how long training lasts: give one of them")
        return cls(str(options.budget), started, started + seconds)

    @property
    def seconds(self) -> float:
        """The budget's length, to the millisecond: the difference of two clock readings
        carries the float's rounding (40 s read 40.000000000007 once the clock had run for
        days)."""
        return round(self.end - self.started, 3)

    @property
    def deadline(self) -> float:
        """When the work must end: the end, moved on by the time not counted."""
        return self.end + self.not_counted

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a first image-cache build) out of the budget."""
        self.not_counted += seconds

    def used(self) -> float:
        """Seconds counted against the budget so far."""
        return time.monotonic() - self.started - self.not_counted

    def share(self, fits_left: int, reserve: float = 0.0) -> Budget:
        """A budget from now for the next of ``fits_left`` fits: an equal part of what is
        left before the deadline, less ``reserve`` seconds kept for the end."""
        now = time.monotonic()
        return Budget(self.text, now, now + (self.deadline - reserve - now) / fits_left)

    def record(self) -> dict:
        """What metrics.json records of the budget itself."""
        return {"budget": self.text, "budget_seconds": round(self.seconds, 3),
                "not_counted_seconds": round(self.not_counted, 3)}


@dataclass
class Plan:
    """The steps chosen for a budget and the figures they were chosen from (all seconds)."""

    steps: int
    epochs: int  # the last one may be partial
    steps_per_epoch: int
    step_seconds: float
    eval_images_per_second: float
    epoch_valid_seconds: float
    final_seconds: float  # the estimate of evaluating the final model and writing the run
    left_seconds: float  # of the budget, when planned
    at_step: int

    def to_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value
                for key, value in asdict(self).items()}


def plan_steps(left: float, *, step_seconds: float, steps_per_epoch: int, steps_done: int,
               epoch_valid_seconds: float, final_seconds: float, epochs_validated: int = 0,
               eval_images_per_second: float = 0.0, budget_text: str = "",
               min_steps: int = MIN_STEPS, max_steps: int | None = None) -> Plan:
    """The most training steps (up to ``max_steps``) that fit in ``left`` seconds (with a
    safety margin), counting what is still to come: the steps after ``steps_done``, a
    validation after every epoch (a partial last one included) not yet validated, and the
    final evaluation. Fewer than ``min_steps`` is an error."""
    usable = left * SAFETY - final_seconds

    def cost(steps: int) -> float:  # of the steps after steps_done, their validations included
        validations = max(math.ceil(steps / steps_per_epoch) - epochs_validated, 0)
        return (steps - steps_done) * step_seconds + validations * epoch_valid_seconds

    low, high = steps_done, steps_done + max(int(usable / step_seconds), 0)
    while low < high:  # the most steps whose cost fits (cost grows with the steps)
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= usable else (low, middle - 1)
    steps = low if max_steps is None else max(min(low, max_steps), steps_done)
    if steps < min_steps:
        needed = (min_steps - steps_done) * step_seconds + epoch_valid_seconds + final_seconds
        raise ImagefitError(
            f"option --budget {budget_text}: {format_duration(max(left, 0))} were left after "
            f"the start, which is not enough for {min_steps} training steps, a validation and "
            f"the final evaluation (about {format_duration(needed)}); give a budget at least "
            f"{format_duration(needed - left)} longer")
    return Plan(steps=steps, epochs=math.ceil(steps / steps_per_epoch),
                steps_per_epoch=steps_per_epoch, step_seconds=step_seconds,
                eval_images_per_second=eval_images_per_second,
                epoch_valid_seconds=epoch_valid_seconds, final_seconds=final_seconds,
                left_seconds=left, at_step=steps_done)


class BudgetPlanner(Callback):
    """Plans the fit's steps to end by ``deadline`` (a ``clock`` reading): first after the
    warm-up and timed steps, again after every epoch; stops training when the deadline
    comes anyway.

    ``final_images``: images the end of the fit evaluates; ``time_final``: measures how many
    of them it evaluates a second, test-time augmentation included (default: as
    ``time_forward`` does); ``fixed_seconds``: the rest of the end (plots, report);
    ``time_forward``: measures validation's images per second (``measure_forward``);
    ``first_plan``: told the first plan (a choice that depends on the fit's length); True
    when it changed the end (which ``time_end`` timed again): the fit is planned anew."""

    order = 5

    def __init__(self, deadline: float, *, final_images: int, n_valid: int,
                 fixed_seconds: float = FINAL_FIXED_SECONDS, budget_text: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 time_forward: Callable[[object], float] | None = None,
                 time_final: Callable[[object], float] | None = None,
                 announce: bool = False,
                 first_plan: Callable[[Plan, object], bool] | None = None,
                 min_steps: int = MIN_STEPS, max_steps: int | None = None) -> None:
        self.deadline = deadline
        self.min_steps, self.max_steps = min_steps, max_steps
        self.announce = announce  # print the first plan
        self.final_images = final_images
        self.n_valid = n_valid
        self.fixed_seconds = fixed_seconds
        self.budget_text = budget_text
        self.clock = clock
        self.time_forward = time_forward or measure_forward
        self.time_final = time_final
        self.first_plan = first_plan  # called with the first plan and the learner
        self.plans: list[Plan] = []
        self.stopped_at_deadline = False
        self._step_times: list[float] = []
        self._epoch_first_step = 0  # index in _step_times of the epoch's first step
        self._valid_times: list[float] = []
        self._eval_rate = 0.0  # images per second
        self._final_rate = 0.0  # images per second of the end's evaluation, TTA included
        self._last = self._epoch_started = self._forward_seconds = 0.0

    @property
    def plan(self) -> Plan | None:
        return self.plans[-1] if self.plans else None

    def before_fit(self, learner) -> None:
        # until the first plan, a schedule too long to move: its first steps are its start
        learner.set_total_steps(10**9)

    def before_epoch(self, learner) -> None:
        self._epoch_first_step = len(self._step_times)
        self._last = self._epoch_started = self.clock()

    def after_batch(self, learner) -> None:
        now = self.clock()
        self._step_times.append(now - self._last)
        self._last = now
        if not self.plans and len(self._step_times) == WARMUP_STEPS + TIMED_STEPS:
            self._measure_evaluation(learner)
            self._plan(learner, validated=learner.epoch)
            self._last = self.clock()  # the forward passes are not a step
            self._forward_seconds = self._last - now
        late = learner.step < learner.n_steps and \
            now >= self.deadline - self._end_seconds() - self._epoch_valid_seconds()
        if distributed.world_size() > 1:  # every rank stops at the same step, or none does
            late = bool(distributed.sum_over_ranks(
                torch.tensor(float(late), device=learner.device)).item())
        if late:
            self.stopped_at_deadline = True
            learner.stop_now = learner.stop = True

    def after_epoch(self, learner) -> None:
        # this epoch's validation: the epoch's time less its training steps
        trained = sum(self._step_times[self._epoch_first_step:])
        if self.n_valid:
            epoch = self.clock() - self._epoch_started
            self._valid_times.append(max(epoch - trained - self._forward_seconds, 1e-6))
            self._forward_seconds = 0.0
            self._eval_rate = self.n_valid / statistics.median(self._valid_times)
        elif not self._eval_rate:
            self._measure_evaluation(learner)
        if not self._final_rate:
            self._measure_evaluation(learner)
        if learner.stop or (self.plans and learner.step >= learner.n_steps):
            return
        self._plan(learner, validated=learner.epoch + 1)

    def time_end(self, learner) -> None:
        """Time the end's evaluation again (its test-time augmentation changed)."""
        self._final_rate = self.time_final(learner) if self.time_final else self._eval_rate

    def _measure_evaluation(self, learner) -> None:
        self._eval_rate = self._eval_rate or self.time_forward(learner)
        self._final_rate = self.time_final(learner) if self.time_final else self._eval_rate

    def evaluation_seconds(self) -> float:
        """The end's evaluation as planned for (the final images at the measured rate, with
        the margin), without its fixed part."""
        return self._end_seconds() - self.fixed_seconds

    def _epoch_valid_seconds(self) -> float:
        if self._valid_times:
            return statistics.median(self._valid_times)
        return self.n_valid / self._eval_rate if self._eval_rate else 0.0

    def _end_seconds(self) -> float:
        evaluating = EVAL_MARGIN * self.final_images / self._final_rate if self._final_rate \
            else 0.0
        return evaluating + self.fixed_seconds

    def _plan(self, learner, validated: int) -> None:
        # the steps of about the last epoch: a machine that slows down is planned for
        recent = max(TIMED_STEPS, len(learner.train_loader))
        timed = (self._step_times[WARMUP_STEPS:] or self._step_times)[-recent:]
        plan = plan_steps(
            self.deadline - self.clock(), step_seconds=statistics.median(timed),
            steps_per_epoch=len(learner.train_loader), steps_done=learner.step,
            epoch_valid_seconds=self._epoch_valid_seconds(), final_seconds=self._end_seconds(),
            epochs_validated=validated, eval_images_per_second=self._eval_rate,
            budget_text=self.budget_text, min_steps=self.min_steps, max_steps=self.max_steps)
        plan = distributed.from_main(plan)  # each rank timed its own steps: rank 0's plan
        self.plans.append(plan)
        learner.set_total_steps(plan.steps)
        if self.announce and len(self.plans) == 1:
            print(f"budget {self.budget_text}: {plan.steps} steps planned "
                  f"({plan.steps / plan.steps_per_epoch:.3g} epochs at "
                  f"{plan.step_seconds * 1000:.3g} ms a step), then "
                  f"{format_duration(plan.final_seconds)} to evaluate and report", flush=True)
        if self.first_plan is not None and len(self.plans) == 1 and \
                self.first_plan(plan, learner):  # the end changed: plan again
            self._plan(learner, validated)

    def phase(self, share: float, max_steps: int) -> BudgetPlanner:
        """A planner for a phase before the main fit (a fine-tune's frozen epochs): at most
        ``max_steps`` steps, in at most ``share`` of the time left; it may plan none."""
        now = self.clock()
        return BudgetPlanner(now + share * (self.deadline - now), final_images=0,
                             n_valid=self.n_valid, fixed_seconds=0.0,
                             budget_text=self.budget_text, clock=self.clock,
                             time_forward=self.time_forward, min_steps=0, max_steps=max_steps)

    def summary(self) -> dict:
        """What metrics.json records of the planning."""
        return {"first_plan": self.plans[0].to_dict() if self.plans else None,
                "plan": self.plan.to_dict() if self.plan else None,
                "replans": max(len(self.plans) - 1, 0),
                "stopped_at_deadline": self.stopped_at_deadline}


@torch.no_grad()
def measure_forward(learner) -> float:
    """Images per second of evaluation: the learner's model in eval mode on the current
    training batch at the validation batch size (twice the training batch), after one
    warm-up pass."""
    model = learner.eval_model
    x = learner.x.detach()
    x = torch.cat([x, x])[: 2 * len(x)]
    was_training = model.training
    model.eval()
    forward = learner.forward_model if model is learner.model else model
    try:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run_model(forward, x, learner.precision, learner.memory_format)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    finally:
        model.train(was_training)
    return len(x) / statistics.median(times[1:])
