"""Data-parallel training on PyTorch's own engine: one process (rank) per device, started by
``torchrun`` (``torch.distributed.run``), which sets RANK, LOCAL_RANK and WORLD_SIZE.

What imagefit keeps the same as one process: ``--bs`` is the global batch. Every rank shuffles
with the same seeded permutation and takes its contiguous share of each global batch (see
``data.loader.Loader``), so N ranks step through the batches one process would, each rank
holding bs/N of them; DistributedDataParallel averages the gradients. Evaluation outputs are
gathered back into one process's order. Only rank 0 writes the run directory and prints.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import rendezvous
from .errors import ImagefitError


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """The processes on this machine (torchrun's --nproc_per_node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0, the one process that writes the run directory and prints (also the only one
    when not distributed)."""
    return rank() == 0


def shard() -> dict[str, int]:
    """This process's share of the data, as ``Loader``'s keyword arguments."""
    return {"rank": rank(), "world_size": world_size()}


SHARD_ENV = "IMAGEFIT_SHARD_CACHE"


def sharded_data() -> bool:
    """Whether each rank decodes, caches and reads only its own share of the rows
    (``training_shares``, ``evaluation_shares``) instead of every rank reading its part of
    each global batch from one whole cache. Across machines it does: a data set then needs
    to fit the machines together, not each one, and each image is decoded once. On one
    machine the ranks share one cache file (the system keeps one copy of its pages), so they
    do not. ``$IMAGEFIT_SHARD_CACHE`` 1 or 0 decides otherwise."""
    if world_size() == 1:
        return False
    forced = os.environ.get(SHARD_ENV, "").strip()
    if forced in {"0", "1"}:
        return forced == "1"
    return world_size() > local_world_size()


def training_shares(rows: np.ndarray, seed: int, ranks: int) -> list[np.ndarray]:
    """Each rank's fixed share of the training ``rows``, sorted: a seeded deal, so every
    class is spread over the ranks and the shares differ by one row at most. Each rank
    shuffles its own share every epoch, so every image is seen once per epoch."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.random.default_rng([seed, 104_729]).permutation(len(rows))
    return [np.sort(rows[order[k::ranks]]) for k in range(ranks)]


def evaluation_shares(rows: np.ndarray, ranks: int) -> list[np.ndarray]:
    """Each rank's share of validation or test ``rows``: contiguous blocks, so the ranks'
    outputs put one after the other are in the rows' order."""
    return np.array_split(np.asarray(rows, dtype=np.int64), ranks)


def gather_objects(value) -> list:
    """Every rank's ``value`` (anything picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Joins the ranks torchrun started, when there are several (gloo on CPUs, nccl on
    GPUs, where each rank takes the GPU of its LOCAL_RANK); yields the device to train on.
    The group is left at the end of the block; after an error the process simply exits."""
    if world_size() == 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    yield device
    if joined:
        dist.destroy_process_group()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (reading the data, building the image cache), then the
    first rank of each other machine (whose cache folder may be its own), then the rest,
    finding the cache made; each waits for its turn at a barrier. With sharded data every
    rank builds its own share at once (the block then exchanges what the shares found)."""
    turn = 0 if is_main() else 1 if os.environ.get("LOCAL_RANK", "0") == "0" else 2
    turns = 3 if world_size() > 1 else 1
    if sharded_data():
        turn, turns = 0, 1
    for _ in range(turn):
        dist.barrier()
    yield
    for _ in range(turns - 1 - turn):
        dist.barrier()


def from_main(value):
    """Rank 0's ``value`` (anything picklable) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped to average its gradients over the ranks (made again for each fit,
    since it registers only the parameters that train at the time)."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


@torch.no_grad()
def share_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, which each rank updates on its own batches)
    on every rank, so all ranks evaluate and save the same model."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def share_weights(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if world_size() > 1:
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (a copy)."""
    if world_size() == 1:
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def gather_in_order(local: torch.Tensor, positions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every rank's ``local`` rows in one tensor, on every rank: rank r's rows go to
    ``positions[r]`` (for a loader, the order one process would have read them in)."""
    counts = [len(where) for where in positions]
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = local.new_zeros((max(counts), *local.shape[1:]), device=device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    result = local.new_empty((sum(counts), *local.shape[1:]))
    for part, where, count in zip(parts, positions, counts):
        result[where] = part[:count].to(result.device)
    return result


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank went away."""
    return isinstance(error, dist.DistError) or "/gloo/transport/" in str(error)


LAUNCHER_PID = "IMAGEFIT_LAUNCHER_PID"  # set for torchrun's processes by ``launch``
PARENT_PID = "IMAGEFIT_PARENT_PID"  # set for the worker processes of ``tune``
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def available_devices(device: str = "auto") -> tuple[int, str]:
    """How many training processes this machine holds for ``--device``: one per CUDA GPU,
    else one per CPU core this process may run on; and what they are."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA GPU(s)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1, "CPU core(s)"


def check_devices(processes: int, device: str = "auto") -> None:
    """Refuse more processes on this machine than it has devices: each holds a copy of the
    model and data, and more of them than cores only thrash (``--devices 99`` on 2 cores
    exhausted the memory)."""
    limit, what = available_devices(device)
    if processes > limit:
        raise ImagefitError(f"--devices {processes}: this machine has {limit} {what}, and "
                            f"each process needs one of its own: give --devices {limit} or "
                            "fewer")


def _death_signal_setter() -> Callable[[int], None] | None:
    """``prctl(PR_SET_PDEATHSIG, signal)`` of Linux's C library, loaded now (a forked child
    must not load libraries); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda signum: prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def die_with_launcher() -> None:
    """In a process torchrun started: be killed when torchrun dies, whatever killed it
    (torchrun puts its processes in sessions of their own, so nothing else would reach
    them), and exit at once if the imagefit command that started torchrun is already gone."""
    set_death_signal = _death_signal_setter()
    if set_death_signal is not None:
        set_death_signal(signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher and not _alive(int(launcher)):
        os._exit(1)


def child_dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that has the child killed when this
    process dies, however it dies (Linux; None elsewhere). The child should also call
    ``exit_if_parent_gone``: this process may have died before the child set the signal."""
    set_death_signal = _death_signal_setter()
    if set_death_signal is None:
        return None
    os.environ[PARENT_PID] = str(os.getpid())  # inherited by the children started next
    return lambda: set_death_signal(signal.SIGKILL)


def exit_if_parent_gone() -> None:
    """In a child started with ``child_dies_with_this_process``: exit at once when the
    process that started it is already gone."""
    parent = os.environ.get(PARENT_PID)
    if parent and not _alive(int(parent)):
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LAUNCH_FLAGS = ("--devices", "--nnodes", "--node-rank", "--master", "--join-timeout")


def launch(argv: Sequence[str], processes: int, device: str = "auto",
           nodes: rendezvous.Nodes | None = None) -> int:
    """Run ``imagefit ARGV`` (less its launch flags) in ``processes`` processes on this
    machine under torchrun, joined with the other machines' of ``nodes`` (see
    ``rendezvous``); returns its exit status, raises when a process failed. torchrun dies
    with this process (a parent-death signal), and its processes with torchrun
    (``die_with_launcher``), so none outlives the command, even after a kill -9. torchrun's
    log folder is one this function makes and removes, not a torchelastic_* folder of its
    own in the temporary directory, which it would leave behind."""
    check_devices(processes, device)
    rest, args = [], iter(argv)
    for arg in args:
        if arg in LAUNCH_FLAGS:
            next(args, None)
        elif not arg.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            rest.append(arg)
    clock = rendezvous.prepare(nodes) if nodes is not None else None
    logs = tempfile.mkdtemp(prefix="imagefit-torchrun-")
    try:
        where = nodes.torchrun_args() if nodes is not None else ["--standalone"]
        status = _run_torchrun([sys.executable, "-m", "torch.distributed.run", *where,
                                f"--log-dir={logs}", f"--nproc_per_node={processes}", "-m",
                                "imagefit", *rest], clock)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    if status and nodes is not None:
        raise ImagefitError(f"a process on this node (node {nodes.rank} of {nodes.count}) or "
                            f"another failed (torchrun's report is above; exit status "
                            f"{status}): node 0's run directory keeps its last finished epoch, "
                            f"continue it with imagefit fit --resume RUN --nnodes N "
                            f"--node-rank R --master {nodes.master} on every node")
    if status:
        raise ImagefitError(f"a process of the {processes} failed (torchrun's report is above; "
                            f"exit status {status}): a run directory keeps its last finished "
                            f"epoch, continue it with imagefit fit --resume RUN --devices "
                            f"{processes}")
    return status


def _run_torchrun(command: list[str], clock: rendezvous.JoinClock | None) -> int:
    """torchrun's exit status; with ``clock``, the nodes' rendezvous watched until all have
    joined. torchrun has a process group of its own, so Ctrl-C reaches it from here only:
    before the rendezvous it is stopped (at its start Python would print a traceback of the
    import it was in), after it torchrun gets the Ctrl-C and stops its processes."""
    set_death_signal = _death_signal_setter()
    launcher = subprocess.Popen(
        command, env={**os.environ, LAUNCHER_PID: str(os.getpid())}, process_group=0,
        preexec_fn=None if set_death_signal is None else lambda: set_death_signal(
            signal.SIGKILL))
    if clock is not None and not rendezvous.watch(launcher, clock):
        raise ImagefitError(f"torchrun stopped before every node joined at "
                            f"{clock.nodes.master} (its report is above; exit status "
                            f"{launcher.returncode}): start every node again with the same "
                            "command")
    try:
        return launcher.wait()
    except KeyboardInterrupt:
        launcher.send_signal(signal.SIGINT)
        launcher.wait()
        raise
