"""Distributed bootstrap from the torchrun environment.

torchrun (and zerofx-launch) export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
With none of them set, zerofx runs as a single process and creates no process group.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(RuntimeError):
    """The torchrun environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int


def world_info() -> WorldInfo:
    """This process's place in the world, whether or not a process group exists."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)),
                         dist.get_world_size())
    return WorldInfo(0, 0, 1)


def init_distributed(*, backend: str | None = None, timeout_s: float = 300.0) -> WorldInfo:
    """Join the process group described by the torchrun environment, once.

    gloo on CPU, nccl when CUDA is available (unless ``backend`` says otherwise). Returns
    world size 1 without a process group when no torchrun variable is set.
    """
    if dist.is_available() and dist.is_initialized():
        return world_info()
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present or os.environ.get("WORLD_SIZE") == "1" and "MASTER_ADDR" not in os.environ:
        return WorldInfo(0, 0, 1)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ and v != "LOCAL_RANK"]
    if missing:
        raise DistributedSetupError(
            f"torchrun environment is incomplete: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; start with zerofx-launch or torchrun, or unset "
            f"{', '.join(present)} to run as a single process"
        )
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} is outside WORLD_SIZE={world}")
    local_rank = _env_int("LOCAL_RANK", default=rank)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    from datetime import timedelta

    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e):
            raise
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DistributedSetupError(
            f"rank {rank} cannot open the rendezvous port {where}: another process (an "
            f"earlier job still running?) is using it. Pass a free port: zerofx-launch "
            f"--master_port <port> (torchrun: --master_port), or stop the other job") from None
    log.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    from zerofx.runtime.comm import error_report

    error_report.install(rank)
    return WorldInfo(rank, local_rank, world)


def same_on_every_rank(value: int, group, device) -> bool:
    """Whether every rank of ``group`` holds the same int64 ``value`` (a checksum, a running
    hash): one 2-element all-reduce of (value, -value) under MAX, equal only if all agree.
    A collective: every rank calls it, and every rank gets the same answer."""
    sig = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX, group=group)
    return int(sig[0]) == -int(sig[1])


def from_first_rank(make, group=None):
    """``make()``, run on the first rank of ``group`` only, and its (picklable) result on
    every rank: choices one rank makes for all (a file it created, a cached form, its
    CPU's matmul forms). A collective."""
    first = dist.get_process_group_ranks(group)[0] if group is not None else 0
    box = [make() if dist.get_rank() == first else None]
    dist.broadcast_object_list(box, src=first, group=group)
    return box[0]


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise DistributedSetupError(f"{name}={raw!r} is not an integer") from None


def init_distributed_like_deepspeed(dist_backend=None, auto_mpi_discovery=True,
                                    distributed_port=29500, verbose=True, timeout=None,
                                    init_method=None, dist_init_required=None, config=None,
                                    rank=-1, world_size=-1) -> WorldInfo:
    """``deepspeed.init_distributed`` with DeepSpeed's arguments, over ``init_distributed``:
    the process group comes from the torchrun environment (zerofx-launch, torchrun).
    ``rank``/``world_size``/``distributed_port`` fill RANK/WORLD_SIZE/MASTER_PORT where the
    environment lacks them and must agree where it has them; an ``init_method`` is refused
    (zerofx joins only through the environment); ``auto_mpi_discovery``, ``verbose``,
    ``dist_init_required`` and ``config`` change nothing here."""
    if init_method is not None:
        raise DistributedSetupError(
            f"init_distributed(init_method={init_method!r}): zerofx joins the process group "
            f"from the torchrun environment only; start with zerofx-launch or torchrun")
    for var, value in (("RANK", rank), ("WORLD_SIZE", world_size)):
        if value is None or value < 0:
            continue
        have = os.environ.get(var)
        if have is not None and have != str(value):
            raise DistributedSetupError(f"init_distributed({var.lower()}={value}) disagrees "
                                        f"with {var}={have} in the environment")
        os.environ.setdefault(var, str(value))
    if "RANK" in os.environ:
        os.environ.setdefault("MASTER_PORT", str(distributed_port))
    seconds = timeout.total_seconds() if timeout is not None else 300.0
    return init_distributed(backend=dist_backend, timeout_s=seconds)

