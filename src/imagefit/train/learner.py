"""``Learner``: the training loop and its events."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable

import torch
from timm.utils import ModelEmaV3
from torch import nn

from .. import distributed
from ..augment.pipeline import BatchPipeline
from ..data.loader import Loader
from ..errors import ImagefitError, ImagefitWarning, TrainingDiverged
from ..forward import loader_outputs
from ..metrics import compute_metrics
from ..models.groups import layer_groups, set_trainable
from ..tasks import Task
from .callbacks.base import EVENTS, Callback, callback_order
from .memory import is_out_of_memory
from .optim import geometric_scales, make_optimizer
from .schedules import Schedule, one_cycle, one_cycle_momentum
from .step import backward, forward_loss, optimizer_step

# On a GPU, reading whether the loss is finite waits for the GPU, so it is read every this
# many steps (the first bad step is remembered on the device); on a CPU at every step.
FINITE_CHECK_STEPS = 16


class Learner:
    """Trains ``model`` on batches from ``train_loader`` through ``pipeline`` and validates
    on ``valid_loader`` after each epoch.

    State that callbacks may read: ``epoch``, ``step`` (batches done in this fit),
    ``n_steps``, ``progress`` (0..1), ``x``, ``y``, ``outputs``, ``loss``, ``history`` (one
    dict per finished epoch) and ``stop`` (set it to end after the current epoch, with
    ``stop_now`` after the current step); and change: ``image_size`` (the size batches are
    resized to), ``mixing`` (MixUp/CutMix on or off) and, through ``set_total_steps``, the
    length of the fit (``--budget``'s planner).

    ``compile``: the training step (and validation without EMA) calls ``torch.compile`` of the
    model, which shares its parameters; ``model`` itself stays the plain module that is
    frozen, averaged and saved. Freezing and unfreezing change ``requires_grad`` and so
    recompile once each. A step that runs out of GPU memory halves the batch size and the
    learning rate for the rest of training and is retried in two halves (``_halve_batch``).

    Data-parallel (``distributed``, under torchrun): each fit trains through the model
    wrapped in DistributedDataParallel, the loaders yield each rank's share of the global
    batches and ``predict`` gathers every rank's outputs; after each epoch the ranks take
    rank 0's buffers (BatchNorm statistics), so they validate and save one model.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_loader: Loader,
        valid_loader: Loader | None,
        pipeline: BatchPipeline,
        *,
        optimizer: str = "adamw",
        weight_decay: float = 0.05,
        callbacks: Iterable[Callback] = (),
        extra_loaders: dict[str, Loader] | None = None,
        seed: int = 0,
        precision: str = "fp32",
        grad_clip: float | None = None,
        accumulate: int = 1,
        ema_decay: float | None = None,
        compile: bool = False,
        channels_last: bool = True,
        lr_factor: float = 1.0,
    ) -> None:
        self.model = model
        self.forward_model = torch.compile(model) if compile else model
        self.data_parallel = None  # the DistributedDataParallel wrapper of a fit on N ranks
        self.compile = compile
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.task = task
        self.train_loader = train_loader
        self.valid_loader = valid_loader
        self.extra_loaders = extra_loaders or {}
        self.pipeline = pipeline
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.callbacks = sorted(callbacks, key=callback_order)
        self.seed = seed
        self.device = next(model.parameters()).device
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.train_images = 0
        self.epoch = self.step = self.n_steps = self.n_epochs = 0
        self.progress = 0.0
        self.stop = self.stop_now = False
        self._anchor = (0, 0.0)  # (step, progress) from which progress runs to n_steps
        self.image_size: int | None = None  # None: the cache's size
        self.mixing = True
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.grad_clip = grad_clip
        self.accumulate = accumulate
        self.ema = ModelEmaV3(model, decay=ema_decay) if ema_decay else None
        self.groups = layer_groups(model)
        self.phase = 0  # fits run so far: fine-tuning runs a frozen fit, then a full one
        self.phase_ends: list[int] = []  # epochs in the history when each fit ended
        self.step_log: list[dict] = []  # learning rate, momentum and loss of every step
        self.frozen_norms: list[nn.Module] = []
        self.resume_state: dict | None = None
        self.lr_scales: list[float] | None = None  # per layer group, for discriminative lrs
        # set by --bs auto, out-of-memory halving and controllers such as reduce-on-plateau
        self.lr_factor = lr_factor
        self._first_bad_step = torch.full((), -1, device=self.device)
        self.fp32_redone = 0  # bf16 steps computed again in fp32 (``_redo_in_fp32``)

    def emit(self, event: str) -> None:
        assert event in EVENTS, event
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self)

    def set_total_steps(self, n_steps: int) -> None:
        """Make this fit ``n_steps`` steps long from here on (the last epoch may be partial);
        the schedule's progress goes on from where it is to 1 at the new end, without a
        jump."""
        self._anchor = (self.step, self.progress_at(self.step))
        self.n_steps = max(n_steps, self.step)
        self.n_epochs = max(math.ceil(self.n_steps / max(len(self.train_loader), 1)), 1)

    def progress_at(self, step: float) -> float:
        """The schedule's progress (0..1) after ``step`` steps of this fit."""
        anchor_step, anchor_progress = self._anchor
        if self.n_steps <= anchor_step:
            return 1.0
        fraction = (step - anchor_step) / (self.n_steps - anchor_step)
        return min(anchor_progress + (1 - anchor_progress) * fraction, 1.0)

    def _set_hyper(self, lr: float, momentum: float | None) -> None:
        self.step_log.append({"step": len(self.step_log) + 1, "lr": lr,
                              "momentum": momentum})
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_factor * group.get("lr_scale", 1.0)
            if momentum is None:
                continue
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            elif "momentum" in group:
                group["momentum"] = momentum

    def freeze_to(self, group: int, train_bn: bool = True) -> None:
        """Train only the layer groups from ``group`` on (negative counts from the end).
        Without ``train_bn``, the frozen BatchNorm layers also keep their running
        statistics (they stay in eval mode while the rest trains)."""
        set_trainable(self.model, self.groups, group, train_bn)
        self.frozen_norms = [
            m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            and not any(p.requires_grad for p in m.parameters())
        ]

    def freeze(self, train_bn: bool = True) -> None:
        """Train the head only (BatchNorm weights of the body too, with ``train_bn``)."""
        self.freeze_to(-1, train_bn)

    def unfreeze(self) -> None:
        self.freeze_to(0)

    def discriminative(self, low: float, high: float) -> None:
        """Spread learning rates geometrically from ``low`` (first group) to ``high`` (head);
        the schedule's value is taken as ``high``."""
        self.lr_scales = geometric_scales(len(self.groups), low, high)

    def group_lrs(self, rates: list[float]) -> None:
        """One learning rate per layer group, first to head; the schedule's value is taken
        as the head's."""
        if len(rates) != len(self.groups):
            raise ImagefitError(f"option --lr-groups: give {len(self.groups)} rates, one per "
                                f"layer group of this model (got {len(rates)})")
        self.lr_scales = [rate / rates[-1] for rate in rates]

    def fit(self, epochs: int, lr: Schedule, momentum: Schedule | None = None) -> list[dict]:
        """Train for ``epochs`` with the learning rate (and momentum) given per step as
        functions of progress; returns the per-epoch history."""
        phase, self.phase = self.phase, self.phase + 1
        start = 0
        resume, self.resume_state = self.resume_state, None
        if resume is not None:
            if resume["phase"] > phase:  # this fit had finished before the interruption
                self.resume_state = resume
                return self.history[:self.phase_ends[phase]]
            start = resume["epoch_in_phase"]
        self.optimizer = make_optimizer(self.model, self.optimizer_name, lr(0.0),
                                        self.weight_decay, self.groups, self.lr_scales)
        self.model.zero_grad(set_to_none=True)  # nothing from before this fit joins step one
        if resume is not None and start:
            self.optimizer.load_state_dict(resume["optimizer"])
            torch.set_rng_state(resume["torch_rng"])
        if distributed.world_size() > 1:  # wrapped anew: DDP syncs the parameters that train now
            self.forward_model = self.model  # the previous wrapper goes first
            wrapped = distributed.data_parallel(self.model)
            self.data_parallel = wrapped
            self.forward_model = torch.compile(wrapped) if self.compile else wrapped
        self.n_epochs = epochs
        self.n_steps = epochs * len(self.train_loader)
        self.step, self.stop, self.stop_now = start * len(self.train_loader), False, False
        self._anchor = (0, 0.0)
        if resume is not None and resume.get("plan"):  # a --budget fit keeps its plan
            self._anchor, self.n_steps, self.n_epochs = resume["plan"]
            self._anchor = tuple(self._anchor)
        self.epoch = start
        self.emit("before_fit")
        while self.epoch < self.n_epochs:
            started = time.perf_counter()
            train_loss = self._train_epoch(lr, momentum)
            row = {"epoch": len(self.history) + 1, "train_loss": train_loss}
            if self.valid_loader is not None:
                row.update(self.evaluate(self.valid_loader, prefix="valid_"))
            for name, loader in self.extra_loaders.items():
                row.update(self.evaluate(loader, prefix=f"{name}_"))
            row["time"] = time.perf_counter() - started
            self.check_epoch_finite(row)
            self.history.append(row)
            self.emit("after_epoch")
            if self.stop:
                break
            self.epoch += 1
        self.epoch = min(self.epoch, max(self.n_epochs - 1, 0))
        self.phase_ends.append(len(self.history))
        self.emit("after_fit")
        return self.history

    def checkpoint_state(self) -> dict:
        """Everything needed to continue exactly after the epoch just finished."""
        finished = self.epoch + 1 >= self.n_epochs or self.stop
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "phase": self.phase if finished else self.phase - 1,
            "phase_ends": self.phase_ends + ([len(self.history)] if finished else []),
            "epoch_in_phase": 0 if finished else self.epoch + 1,
            "plan": None if finished else [list(self._anchor), self.n_steps, self.n_epochs],
            "torch_rng": torch.get_rng_state(),
            "step_log": [{k: float(v) if isinstance(v, torch.Tensor) else v
                          for k, v in row.items()} for row in self.step_log],
            "lr_factor": self.lr_factor,
            "batch_size": self.train_loader.batch_size,
            "train_seconds": self.train_seconds,
            "train_images": self.train_images,
            "fp32_redone": self.fp32_redone,
        }

    def load_checkpoint_state(self, state: dict) -> None:
        """Take up a checkpoint: the next ``fit`` calls skip or continue where it stopped."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.history = list(state["history"])
        self.phase_ends = list(state["phase_ends"])
        self.step_log = list(state["step_log"])
        self.lr_factor = state["lr_factor"]
        self.train_loader.batch_size = state.get("batch_size", self.train_loader.batch_size)
        self.train_seconds = state["train_seconds"]
        self.train_images = state["train_images"]
        self.fp32_redone = state.get("fp32_redone", 0)
        self.resume_state = state

    def fit_one_cycle(self, epochs: int, lr_max: float, pct_start: float = 0.25,
                      moms: tuple[float, float] = (0.95, 0.85)) -> list[dict]:
        """One-cycle: warm up to ``lr_max`` and anneal, momentum moving the other way."""
        return self.fit(epochs, one_cycle(lr_max, pct_start),
                        one_cycle_momentum(moms[0], moms[1], pct_start))

    def _train_epoch(self, lr: Schedule, momentum: Schedule | None) -> float:
        self.model.train()
        for norm in self.frozen_norms:
            norm.eval()
        epochs_done = len(self.history)  # over all fits, so each epoch shuffles anew
        self.train_loader.set_epoch(epochs_done)
        generator = torch.Generator(self.device).manual_seed(
            self.seed * 1009 + epochs_done + 100_003 * self.train_loader.rank)
        self.emit("before_epoch")
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        started = time.perf_counter()
        for x, y in self.train_loader:
            if self.step >= self.n_steps or self.stop_now:  # a planned or stopped partial epoch
                break
            rows, done = self.train_loader.batch_rows, 0
            while done < len(y):  # one piece, unless running out of memory halved the batch
                piece = slice(done, done + self.train_loader.batch_size)
                self.train_loader.batch_rows = rows[piece]
                self.progress = self.progress_at(self.step)
                if not self._train_step(x[piece], y[piece], generator, lr, momentum):
                    continue
                count = len(y[piece])
                loss_sum += self.loss.detach() * count
                seen += count
                done += count
                self.step += 1
                self.emit("after_batch")
        self.train_seconds += time.perf_counter() - started
        loss_sum, seen = distributed.sum_over_ranks(
            torch.stack([loss_sum, torch.tensor(float(seen), device=self.device)])).tolist()
        self.train_images += int(seen)
        distributed.share_buffers(self.model)
        if self.ema is not None:
            distributed.share_buffers(self.ema.module)
        return loss_sum / max(seen, 1)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                    lr: Schedule, momentum: Schedule | None) -> bool:
        """One batch: augment, forward, loss, backward and (every ``accumulate``) step.
        False when it ran out of memory: the batch size was halved, nothing was learned."""
        self._set_hyper(lr(self.progress), momentum(self.progress) if momentum else None)
        try:
            with self._gradients_kept_local():
                redone = self._add_gradients(x, y, generator, events=True)
                self._watch_loss()
                if redone:
                    self._count_fp32_redo()
                self._step_if_due()
            self.step_log[-1]["loss"] = self.loss.detach()
            return True
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            if distributed.world_size() > 1:  # the other ranks would wait for this one
                raise ImagefitError("out of memory in data-parallel training: give a smaller "
                                    "--bs") from error
            if self.train_loader.batch_size == 1:
                raise ImagefitError("out of memory with a batch of one image: choose a smaller "
                                    "--model or --image-size, or --precision bf16") from error
        self._halve_batch()  # outside the handler, once its frames no longer hold tensors
        return False

    def sweep_gradients(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        """The LR finder's half of a training step: the batch's loss (detached; NaN or
        infinite where it diverged) with its gradients added to the model's, computed as
        ``_train_step`` computes them, without events and without stopping on a non-finite
        loss (the finder reads that as its end)."""
        self._add_gradients(x, y, generator, events=False)
        return self.loss.detach()

    def _add_gradients(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                       events: bool) -> bool:
        """Augment the batch, forward it in the learner's precision and memory format, and
        add its gradients (divided by ``accumulate``). A loss or gradient that bf16 made
        non-finite on a CPU is computed again in fp32 (``_redo_in_fp32``); whether it was."""
        self.x, self.y = self.pipeline.train_batch(x, y, generator, size=self.image_size,
                                                   mix=self.mixing)
        self.x = self.x.contiguous(memory_format=self.memory_format)
        if events:
            self.emit("before_batch")
        self._forward(self.precision)
        redone = self._arithmetic_fault(self.loss.detach())
        if redone:
            self._redo_in_fp32()
        if events:
            self.emit("after_loss")
        self._backward()
        if not redone and self._arithmetic_fault(self._gradient_norm()):
            self._redo_in_fp32()
            self._backward()
            redone = True
        return redone

    def _gradients_kept_local(self):
        """On the micro-steps of --accumulate that do not step the optimizer, the ranks keep
        their gradients to themselves (DDP's ``no_sync``): one all-reduce per optimizer step,
        of the summed gradients, instead of one per batch."""
        if self.data_parallel is None or self._steps_optimizer():
            return contextlib.nullcontext()
        return self.data_parallel.no_sync()

    def _steps_optimizer(self) -> bool:
        """Whether this batch ends an --accumulate group and steps the optimizer."""
        return (self.step + 1) % self.accumulate == 0

    def _watch_loss(self) -> None:
        """Stop at the first step whose loss is NaN or infinite: stepping on it would make
        every weight NaN. On a GPU the first bad step is kept on the device and read every
        ``FINITE_CHECK_STEPS`` steps and at the end of the epoch."""
        bad = ~torch.isfinite(self.loss.detach())
        if self.device.type == "cpu":
            if bad:
                raise self.diverged(self.step, "the training loss")
            return
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0),
                                           torch.full_like(self._first_bad_step, self.step),
                                           self._first_bad_step)
        if self.step % FINITE_CHECK_STEPS == 0:
            self._raise_if_diverged()

    def _raise_if_diverged(self) -> None:
        step = int(self._first_bad_step)
        if step >= 0:
            raise self.diverged(step, "the training loss")

    def check_epoch_finite(self, row: dict) -> None:
        """Before an epoch is recorded (and its model saved): its losses and the weights are
        finite."""
        self._raise_if_diverged()
        for column in ("train_loss", "valid_loss"):
            if column in row and not math.isfinite(row[column]):
                raise self.diverged(self.step, f"the epoch's {column.replace('_', ' ')}")
        totals = torch.stack([p.detach().float().sum() for p in self.eval_model.parameters()])
        if not bool(torch.isfinite(totals).all()):
            raise self.diverged(self.step, "the weights")

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        """The error for a non-finite loss or weight, with the likely cause and what to do."""
        epoch = len(self.history) + 1
        steps = max(len(self.train_loader), 1)
        where = f"at step {step % steps + 1} of epoch {epoch}" if what == "the training loss" \
            else f"in epoch {epoch}"
        if self.precision == "fp16":
            cause = ("fp16 arithmetic overflowed (its largest number is 65504): train with "
                     "--precision bf16 or fp32")
        else:
            lr = max(group["lr"] for group in self.optimizer.param_groups) \
                if self.optimizer is not None else float("nan")
            cause = (f"the learning rate ({lr:.3g} at that step) is most likely too high: "
                     "give a lower --lr (e.g. a tenth) or --lr auto")
        return TrainingDiverged(f"training diverged: {what} became NaN or infinite {where}; "
                                f"{cause}")

    def _halve_batch(self) -> None:
        """After running out of memory: half the batch size and the learning rate (the
        schedule's factor) from this step on. The step is retried on each half of its batch,
        so every image of the epoch is still seen; gradients accumulated so far are
        dropped."""
        self.step_log.pop()  # the failed step learned nothing
        self.x = self.y = self.outputs = self.loss = None
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        size = self.train_loader.batch_size
        self.train_loader.batch_size = size // 2
        self.lr_factor *= (size // 2) / size
        self._anchor = (self.step, self.progress_at(self.step))
        self.n_steps = self.step + 2 * (self.n_steps - self.step)
        warnings.warn(f"out of memory with batches of {size} images: training goes on with "
                      f"batches of {size // 2} and the learning rate scaled by "
                      f"{(size // 2) / size:g}", ImagefitWarning, stacklevel=2)

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
                progress: bool = True, seconds: float | None = None):
        """Sweep the learning rate (see ``lr_finder.find_lr``) with the arithmetic of this
        learner's training steps; the model and the grad scaler are left as they were."""
        from .lr_finder import find_lr

        # the random state stays too (dropout draws from it), so that the fit after the sweep
        # trains as one at the rate it found: `fit --config RUN/config.yaml` repeats it
        devices = [self.device] if self.device.type == "cuda" else []
        scaler = self.scaler.state_dict() if self.scaler else None
        try:
            with torch.random.fork_rng(devices=devices):
                return find_lr(self, start_lr, end_lr, steps, progress=progress, seconds=seconds)
        finally:
            self.x = self.y = self.outputs = self.loss = None  # the sweep's last batch
            if scaler:
                self.scaler.load_state_dict(scaler)

    def _forward(self, precision: str) -> None:
        self.outputs, self.loss = forward_loss(self.forward_model, self.x, self.y,
                                               self.training_loss, precision,
                                               self.memory_format)

    def training_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss trained on: the task's, with its class weights."""
        return self.task.loss(outputs, targets, weighted=True)

    def _arithmetic_fault(self, value: torch.Tensor | None) -> bool:
        """Whether a non-finite loss or gradient norm may be bf16's fault on this CPU rather
        than the fit's. torch 2.14's oneDNN (3.12) reads past the valid K columns of a matrix
        in its AMX bf16 kernels when K is not a multiple of the tile (oneDNN issue 5717, fixed
        after 3.14): stray NaN bytes then reach an output, now and then, on CPUs with AMX
        only. One process: under data parallelism a step redone on one rank would leave the
        others waiting, and a NaN there stops the fit as a divergence."""
        return (value is not None and self.precision == "bf16" and self.device.type == "cpu"
                and distributed.world_size() == 1 and not bool(torch.isfinite(value)))

    def _gradient_norm(self) -> torch.Tensor | None:
        if self.precision != "bf16" or self.device.type != "cpu":
            return None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else None

    def _redo_in_fp32(self) -> None:
        """The batch computed again without autocast: a loss that is finite in fp32 was an
        arithmetic fault, and training goes on (``_count_fp32_redo``); one that is not is a
        divergence (``_watch_loss``; the LR finder's end). Under ``--accumulate`` the
        group's gradients so far are dropped with the faulty ones."""
        self.model.zero_grad(set_to_none=True)
        self._forward("fp32")

    def _count_fp32_redo(self) -> None:
        """A training step that fp32 computed where bf16 failed: counted, the first one
        told."""
        self.fp32_redone += 1
        if self.fp32_redone == 1:
            warnings.warn(f"bf16 arithmetic gave a non-finite loss or gradient at step "
                          f"{self.step + 1}: the step was computed in fp32 (a fault of the CPU "
                          f"kernels, see docs/DESIGN.md; metrics.json counts such steps)",
                          ImagefitWarning, stacklevel=2)

    def _backward(self) -> None:
        backward(self.loss, self.accumulate, self.scaler)

    def _step_if_due(self) -> None:
        """Every ``accumulate`` batches: step (``step_optimizer``), EMA."""
        if not self._steps_optimizer():
            return
        self.step_optimizer(self.optimizer)
        if self.ema is not None:
            self.ema.update(self.model)
        self.emit("after_step")

    def step_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """A training step's update (the LR finder's too, with its own ``optimizer``):
        unscale (fp16), clip to ``grad_clip``, step and zero the gradients."""
        optimizer_step(self.model.parameters(), optimizer, self.grad_clip, self.scaler)

    @property
    def eval_model(self) -> nn.Module:
        """The model validation and prediction use: the EMA of the weights when kept."""
        return self.ema.module if self.ema is not None else self.model

    def predict(self, loader: Loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs and targets of every batch of ``loader``, on the CPU, in its order:
        the forward pass evaluate, predict and explain run too (``forward.loader_outputs``)."""
        model = self.eval_model
        result = loader_outputs(model, self.pipeline, self.task, loader, size=self.image_size,
                                precision=self.precision, memory_format=self.memory_format,
                                call=self.forward_model if model is self.model else model)
        model.eval()  # as validation has always left it; fit() sets the mode per epoch
        return result["outputs"], result["targets"]

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Loss and the task's metrics of raw ``outputs`` against ``targets``."""
        outputs, targets = outputs.float().cpu(), targets.cpu()
        return {"loss": self.task.loss(outputs, targets).item(),
                **compute_metrics(self.task, outputs, targets)}

    def evaluate(self, loader: Loader, prefix: str = "") -> dict[str, float]:
        """Loss and the task's metrics over ``loader``."""
        results = self.score(*self.predict(loader))
        return {prefix + name: value for name, value in results.items()}
