"""One run on several processes: torch.distributed and DistributedDataParallel (DDP).

A run on N processes ("ranks") computes what one process computes at the same global batch:
- each rank trains on its own share of every global batch (`builders.ShuffledBatches` with a rank:
  the same seeded order on every rank, each taking a slice, so N processes see exactly the batches
  one process sees);
- BatchNorm layers that train normalise over the global batch, as one process does
  (`nn.SyncBatchNorm` on CUDA; on CPU, where torch's refuses, `GlobalBatchNorm2d` below);
- the focal loss is divided by the batch-total foreground count, all-reduced (`criterion`);
- DDP averages the gradients of the ranks, so each rank's loss is its share of the global loss
  times N.
What differs: the random flips (each rank draws its own, from a seed of its own) and, on a data set
of mixed image sizes, the padding of each rank's part of the batch.

Rank 0 is the run's face: console, progress bars, tracking, checkpoints and the evaluation. The
other ranks only train. Two ways in: under `torchrun` (its RANK / WORLD_SIZE / LOCAL_RANK
variables), every process is a rank; with `train.nproc` N (`--nproc N`) the process that runs the
run becomes rank 0 and starts ranks 1..N-1 itself (`spawned`).
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ablate import lease
from ablate.errors import AblateError, ConfigError, one_line

BACKENDS = ("auto", "gloo", "nccl")
# How long a rank waits in a collective for the others, and how long any rank may go without
# progress before its watchdog ends it ($ABLATE_COLLECTIVE_TIMEOUT, seconds). Long enough for rank
# 0's resume checkpoint of a large model on a slow shared disk (1.6 s measured for ResNet-50-FPN on
# a loaded machine) and for its first, autotuned steps; short enough that a run whose rank died or
# hangs frees its machine within minutes.
COLLECTIVE_TIMEOUT_SECONDS = 600.0
RENDEZVOUS_SECONDS = 600.0  # how long the ranks may take to meet (start-up), whatever the collective bound
PARENT_CHECK_SECONDS = 1.0  # how often a started rank checks that rank 0, its parent, still lives


def collective_timeout() -> float:
    """$ABLATE_COLLECTIVE_TIMEOUT (seconds > 0), else COLLECTIVE_TIMEOUT_SECONDS."""
    text = os.environ.get("ABLATE_COLLECTIVE_TIMEOUT", "").strip()
    if not text:
        return COLLECTIVE_TIMEOUT_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"ABLATE_COLLECTIVE_TIMEOUT: expected seconds > 0, got {text!r}")
    return value


class RankLost(AblateError):
    """A rank of the run died or stopped answering: the run cannot go on, but another attempt,
    from its last resume checkpoint, may (a killed process, a preempted GPU)."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a run: its rank, the number of ranks, its rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over the ranks, in place (itself on one process)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


SINGLE = Ranks()


def from_env() -> Ranks | None:
    """This process's place in a `torchrun` launch (None when not launched so)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def backend_for(name: str, device: torch.device) -> str:
    """The process-group backend: `name` (auto: nccl on CUDA, gloo on CPU), checked usable."""
    if name not in BACKENDS:
        raise ConfigError(f"train.backend: '{name}' is not a backend (one of {', '.join(BACKENDS)})")
    if name == "auto":
        name = "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise ConfigError("train.backend: nccl needs CUDA GPUs (and a CUDA build of torch); use gloo on CPU")
    if name == "gloo" and not dist.is_gloo_available():
        raise ConfigError("train.backend: gloo is not built into this torch")
    return name


def check_nproc(nproc: int, device: torch.device) -> None:
    """One process per GPU on CUDA; on CPU at most one per core (more only slow each other down)."""
    if nproc < 1:
        raise ConfigError(f"train.nproc: must be >= 1, got {nproc}")
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if nproc > available:
            raise ConfigError(f"--nproc {nproc}: only {available} CUDA device(s) visible here")
    elif nproc > (os.cpu_count() or 1):
        raise ConfigError(f"--nproc {nproc}: only {os.cpu_count()} CPU cores here (one process per core at most)")


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """A rank's device: on CUDA the GPU of its local rank, else `device`."""
    if device.type == "cuda" and ranks.distributed:
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s augmentation: the run's own on rank 0 (so one process is unchanged),
    a distinct one derived from (seed, rank) on the others."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def threads_per_rank(world_size: int) -> int:
    """CPU threads for each of `world_size` ranks started by this process: its own threads shared
    out (a grid worker's are already its share of the machine)."""
    return max(1, torch.get_num_threads() // world_size)


# ---------------------------------------------------------------------------------- BatchNorm


class _AllSum(torch.autograd.Function):
    """A sum over the ranks that gradients flow back through: the gradient of each rank's input is
    the sum of the ranks' output gradients (every rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d normalising with the statistics of the global batch (every rank's images), like
    one process over that batch. torch's SyncBatchNorm does this on GPUs only; this is the CPU
    (gloo) path. The statistics are summed over the ranks with `_AllSum`, so gradients flow through
    them as through one process's batch statistics."""
    # (torch.distributed.nn.functional.all_reduce does what _AllSum does, but is deprecated.)

    def forward(self, x: Tensor) -> Tensor:  # x [B, C, H, W]
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        channels = x.shape[1]
        # One all-reduce forward (and one backward) per layer: the sums of x and x^2 with the count,
        # accumulated in float64 so that E[x^2] - E[x]^2 keeps BatchNorm's precision. (Two passes
        # need two each way; measured on the tiny preset, 2 gloo ranks: 98 vs 95 img/s. What costs
        # is these unfused passes over the activations: frozen BatchNorm trains at 196 img/s.)
        count = torch.full((1,), x.numel() // channels, dtype=torch.float64, device=x.device)
        local = torch.cat([x.sum(dim=(0, 2, 3), dtype=torch.float64),
                           (x * x).sum(dim=(0, 2, 3), dtype=torch.float64), count])  # [2C + 1]
        sums = _AllSum.apply(local)
        total = sums[-1]
        mean64 = sums[:channels] / total  # [C]
        var = (sums[channels:2 * channels] / total - mean64 * mean64).clamp(min=0).to(x.dtype)  # [C], biased
        mean = mean64.to(x.dtype)
        centred = x - mean.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = (var * total / (total - 1).clamp(min=1)).to(self.running_var.dtype)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def global_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` (still on the CPU) with every trainable BatchNorm2d normalising over the global
    batch: torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere (frozen BatchNorm has nothing
    to sync)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            global_batchnorm(child, device)
    return model


def wrap(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """`model` (on `device`, BatchNorm made global) as DDP: gradients averaged over the ranks;
    `model` itself on one process."""
    if not ranks.distributed:
        return model
    # Buffers need no broadcast: BatchNorm's running statistics are the same on every rank (global
    # batch statistics) and frozen BatchNorm's never change.
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               forward_sync_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------- process group


@contextlib.contextmanager
def joined(ranks: Ranks, backend: str, init_method: str = "env://") -> Iterator[Ranks]:
    """This process in the run's process group for the duration (left again afterwards), its
    collectives bounded by collective_timeout() and its progress watched by a watchdog with the
    same bound: a rank stuck in a kernel, or waiting on a dead or stuck peer, ends within it."""
    limit = collective_timeout()
    # Meeting takes longer than a step (each rank imports torch and builds its data first): the
    # group is made with room for that, then its collectives get the bound.
    dist.init_process_group(backend, init_method=init_method, rank=ranks.rank, world_size=ranks.world_size,
                            timeout=datetime.timedelta(seconds=max(limit, RENDEZVOUS_SECONDS)))
    dist.set_timeout(datetime.timedelta(seconds=limit))
    try:
        with lease.watchdog(limit, f"rank {ranks.rank} of {ranks.world_size}"):
            yield ranks
    except Exception as e:
        if is_collective_error(e):
            raise RankLost(f"rank {ranks.rank} of {ranks.world_size}: a collective failed ({one_line(e)[:300]}); "
                           "another rank died or stopped answering") from None
        raise
    finally:
        dist.destroy_process_group()


def is_collective_error(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because a peer went away or timed out."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        hint in text for hint in ("gloo", "Connection closed by peer", "Connection reset", "Timed out", "NCCL"))


@contextlib.contextmanager
def spawned(nproc: int, backend: str, target: Callable[..., Any], args: tuple) -> Iterator[Ranks]:
    """This process as rank 0 of `nproc`, with ranks 1..nproc-1 started as processes that run
    `target(rank, nproc, backend, init_method, *args)`. They meet through a file (one machine).
    On leaving, the other ranks are waited for (they end with their training loop); any left
    over after a failure is killed."""
    # Fresh interpreters (no forked torch or MLflow threads), not daemons: they may start loader workers.
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ablate-ddp-") as folder:
        init_method = Path(folder, "rendezvous").as_uri()
        per_rank = threads_per_rank(nproc)
        helpers = [context.Process(target=_rank_entry, args=(target, rank, nproc, backend, init_method, per_rank,
                                                              *args),
                                   name=f"ablate-rank-{rank}") for rank in range(1, nproc)]
        threads = torch.get_num_threads()
        torch.set_num_threads(per_rank)
        try:
            for helper in helpers:
                helper.start()
            try:
                with joined(Ranks(0, nproc, 0), backend, init_method) as ranks:
                    yield ranks
            except RankLost as e:
                raise RankLost(f"{e}; {helper_states(helpers)}") from None
            for helper in helpers:
                helper.join(timeout=collective_timeout())
        finally:
            torch.set_num_threads(threads)
            for helper in helpers:
                if helper.is_alive():
                    helper.kill()
                    helper.join()


def helper_states(helpers: list) -> str:
    """'rank 1 exited (signal 9)' / 'rank 1 still running' for each started rank."""
    def state(helper) -> str:
        code = helper.exitcode
        if code is None:
            return "still running"
        return f"exited (signal {-code})" if code < 0 else f"exited ({code})"

    return ", ".join(f"{helper.name.removeprefix('ablate-').replace('-', ' ')} {state(helper)}" for helper in helpers)


def _leave_with_parent(rank: int) -> None:
    """A thread that ends this rank as soon as rank 0, its parent, is gone (killed, or ended by its
    own watchdog): a rank left alone would otherwise wait in a collective until its timeout."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_SECONDS)
            if os.getppid() != parent:
                print(f"rank {rank}: rank 0 is gone; ending", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="ablate-parent-watch", daemon=True).start()


def _rank_entry(target: Callable[..., Any], rank: int, nproc: int, backend: str, init_method: str, threads: int,
                *args) -> None:
    """A spawned rank: it leaves signals to rank 0 (a Ctrl-C reaches the whole terminal's process
    group; rank 0 stops every rank at the same iteration through the training loop's step sync),
    and ends when rank 0 ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal's SIGHUP: rank 0 handles it like SIGTERM
    _leave_with_parent(rank)
    torch.set_num_threads(threads)
    try:
        target(rank, nproc, backend, init_method, *args)
    except Exception as e:  # noqa: BLE001 - rank 0 reports the run's error; this rank says one line
        print(f"rank {rank} of {nproc} stopped: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
