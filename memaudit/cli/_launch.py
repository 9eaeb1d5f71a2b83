"""Joining a ``torchrun`` launch: the process group, each rank's device, one-line errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from memaudit.cli._app import err, out
from memaudit.errors import MemauditError
from memaudit.localize import World


def timeout() -> timedelta:
    """How long the rendezvous and a collective wait for a slow rank: ``MEMAUDIT_DIST_TIMEOUT``
    seconds (default 1800)."""
    try:
        return timedelta(seconds=float(os.environ.get("MEMAUDIT_DIST_TIMEOUT", "1800")))
    except ValueError:
        raise MemauditError("MEMAUDIT_DIST_TIMEOUT must be a number of seconds") from None


def launched_world() -> int:
    """The world size ``torchrun`` set (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MemauditError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def rank_device(device: str) -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is asked for (or ``auto`` finds it),
    else the device given (CPU ranks share the host)."""
    if launched_world() <= 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        raise MemauditError(
            f"rank {os.environ.get('RANK', local)} wants cuda:{local} but this node has {count} "
            f"GPU(s): launch with --nproc-per-node {count} or fewer"
        )
    torch.cuda.set_device(local)
    return f"cuda:{local}"


@contextmanager
def process_group(device: str, *, most: int, per: str) -> Iterator[World]:
    """Join the process group of a ``torchrun`` launch (gloo on CPU, nccl on CUDA) for the
    block; a single process when not launched by it. A launch of more than ``most``
    processes, one per ``per`` (e.g. ``flagged ids``), is refused."""
    size = launched_world()
    if size <= 1:
        yield World()
        return
    if size > most:
        raise MemauditError(
            f"{size} processes for {most} {per}: launch with --nproc-per-node (times "
            f"--nnodes) of {most} or fewer"
        )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout())
    except (RuntimeError, ValueError, TimeoutError) as failure:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        reason = str(failure).strip().splitlines()[0] if str(failure).strip() else "no reason"
        raise MemauditError(
            f"cannot join the torchrun rendezvous at {where} ({reason}): check --rdzv-endpoint "
            "(or --master-addr / --master-port) and that every node can reach it"
        ) from None
    try:
        yield World.current()
    finally:
        dist.destroy_process_group()


@contextmanager
def quiet(enabled: bool) -> Iterator[None]:
    """Nothing printed on the consoles (tables, progress, warnings) in the block when
    ``enabled``: the ranks but 0 of a launch, as rank 0 speaks for all. Errors still print."""
    was = out.quiet, err.quiet
    if enabled:
        out.quiet = err.quiet = True
    try:
        yield
    finally:
        out.quiet, err.quiet = was
