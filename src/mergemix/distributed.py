"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), and small collectives.

One process (no torchrun) is world size 1 and never touches ``torch.distributed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place in the run: its rank, the number of processes and its device (on a GPU:
    the one of its local rank)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_seed(seed: int, rank: int, steps_done: int = 0) -> int:
    """Process ``rank``'s seed: ``seed`` itself on rank 0 of a fresh run (what a one-process run draws);
    otherwise one derived from (seed, rank, steps_done), below 2³², so that no rank repeats another
    seed's streams (``seed + r`` would: rank 1 of seed 42 drew what rank 0 of seed 43 draws, and a sweep
    over seeds shared its draws), nor, after a resume that restarts the streams, a fresh run's."""
    if rank == 0 and steps_done == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, steps_done]).generate_state(1)[0])


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a ``--device`` value names (auto: CUDA, else MPS, else CPU; cuda: this process's
    GPU); ``ConfigError`` for a name torch does not know or a GPU (CUDA or MPS) that is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name} but this machine has no MPS (Apple GPU) device: use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but no CUDA device is visible: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device_name: str) -> Context:
    """Pick the device and, under torchrun, join the process group (nccl on CUDA, gloo otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Context(rank, world_size, device)


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if ctx.distributed:
        dist.barrier()


def sums(values: list[float], ctx: Context) -> list[float]:
    """Element-wise sums of a few floats over processes."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def any_true(flags: list[bool], ctx: Context) -> list[bool]:
    """Element-wise OR of a few flags over processes (so every process takes the same branch)."""
    if not ctx.distributed:
        return flags
    t = torch.tensor([float(f) for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def on_main(fn: Callable[[], T], ctx: Context, what: str) -> T | None:
    """``fn()`` on rank 0 only (its result there, None elsewhere); the ``ConfigError`` it raises is every
    rank's, since the others would otherwise wait for it in their next collective and fail with a
    connection error of their own. ``what``: what rank 0 did, for the other ranks' message."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except ConfigError as e:
            error = e
    if any_true([error is not None], ctx)[0]:
        raise error or ConfigError(f"rank 0 could not {what} (its error says why)")
    return result


def gather(obj: Any, ctx: Context) -> list[Any]:
    """Every process's ``obj``, in rank order (on every process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
