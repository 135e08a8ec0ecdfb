"""Where a runtime's tensors and collectives live: its one device and its process groups.

Megatron's layout: tensor-parallel neighbours are adjacent ranks (their traffic is the
heaviest, so it stays within a node); a data-parallel group holds the ranks with the same
tensor-parallel rank. Every rank creates every group, in one order, as torch requires.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from zerofx.config import ConfigError
from zerofx.plan import Plan


def groups(plan: Plan, mpu):
    """(data-parallel group or None, tensor-parallel group or None) of this rank.

    Every rank creates every group in the same order, as torch requires. A group of one
    rank is None: nothing to communicate.
    """
    grid = plan.grid
    if mpu is not None:
        _check_mpu(mpu, plan)
        return (mpu.get_data_parallel_group() if grid.dp_size > 1 else None,
                mpu.get_model_parallel_group() if grid.tp_size > 1 else None)
    if grid.tp_size == 1:
        return dist.group.WORLD, None
    tp = _mine(plan.rank, grid.tp_groups())
    dp = _mine(plan.rank, grid.dp_groups())
    return (dp if grid.dp_size > 1 else None), tp


def _mine(rank: int, rank_lists: list[list[int]]):
    """Create a group for every list in ``rank_lists`` (every rank creates every group, in
    one order, as torch requires); return the one ``rank`` belongs to."""
    mine = None
    for ranks in rank_lists:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


def device_of(named) -> torch.device:
    """The one device the trained parameters are on (what the runtime allocates on)."""
    devices = {p.device for _, p in named}
    if len(devices) > 1:
        where = {}
        for n, p in named:
            where.setdefault(p.device, n)
        raise ConfigError(f"zerofx keeps one flat buffer per model, on one device, but the "
                          f"trained parameters are on {sorted(map(str, devices))} (e.g. "
                          f"{'; '.join(f'{n} on {d}' for d, n in where.items())}): move the "
                          f"model with model.to(device) first")
    (device,) = devices
    if device.type == "meta":
        raise ConfigError("the model's parameters are on the meta device (no values): "
                          "materialise them (model.to_empty(device=...) and initialise) first")
    if dist.is_available() and dist.is_initialized() and \
            dist.get_backend() == "nccl" and device.type != "cuda":
        raise ConfigError(f"the process group uses nccl, which moves CUDA tensors only, but "
                          f"the model is on {device}: move it with "
                          f"model.to(torch.cuda.current_device()) (zerofx.initialize does)")
    return device


def gather_group(plan: Plan):
    """Stage 3's parameter-gather group: this rank's data-parallel ranks (the ranks holding
    the other shards of the same tensor-parallel pieces), a group of its own so the graphs'
    gathers never pair with bucket collectives in flight on the data-parallel group."""
    return _mine(plan.rank, plan.grid.dp_groups())  # without TP: one group of every rank


def _check_mpu(mpu, plan: Plan) -> None:
    grid, rank = plan.grid, plan.rank
    got = (mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank(),
           mpu.get_data_parallel_world_size())
    if got != (grid.tp_rank(rank), grid.dp_rank(rank), grid.dp_size):
        raise ConfigError(
            f"mpu on rank {rank} reports (model-parallel rank, data-parallel rank, "
            f"data-parallel size) = {got}, but zerofx lays ranks out Megatron's way "
            f"(model-parallel neighbours adjacent): expected "
            f"{(grid.tp_rank(rank), grid.dp_rank(rank), grid.dp_size)}")
