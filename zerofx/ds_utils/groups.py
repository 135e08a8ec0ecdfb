"""``deepspeed.utils.groups``: the process-group helpers scripts call, on torch.distributed.

DeepSpeed answers from the groups its engine set up (data parallel over the ranks an mpu
does not split, tensor parallel from the mpu). zerofx answers from the layout of the latest
live zerofx runtime (the engine's: ``tensor_parallel.size`` or the mpu given to
``initialize``); before one exists, from the world: every rank data-parallel, no tensor
parallelism. A group of one rank is None on a run without a process group.
Expert- and sequence-parallel groups: zerofx has neither (sizes 1; expert helpers refused).
"""
from __future__ import annotations

import torch.distributed as dist

import zerofx.graph_ops as graph_ops


def _runtime():
    live = graph_ops.registered()
    return live[-1] if live else None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_group():
    return dist.group.WORLD if _initialized() else None


# ---- data parallel ----------------------------------------------------------------------
def _get_data_parallel_group():
    rt = _runtime()
    if rt is not None and rt.plan.grid.tp_size > 1:
        return rt.comm.group
    return _world_group()


def _get_data_parallel_world_size() -> int:
    rt = _runtime()
    if rt is not None:
        return rt.plan.grid.dp_size
    return dist.get_world_size() if _initialized() else 1


def _get_data_parallel_rank() -> int:
    rt = _runtime()
    if rt is not None:
        return rt.plan.grid.dp_rank(rt.plan.rank)
    return dist.get_rank() if _initialized() else 0


def _get_broadcast_src_rank() -> int:
    """The global rank of data-parallel rank 0 in this rank's data-parallel group."""
    rt = _runtime()
    if rt is not None:
        return rt.plan.grid.tp_rank(rt.plan.rank)  # dp rank 0 of this TP column
    return 0


get_data_parallel_group = _get_data_parallel_group
get_data_parallel_world_size = _get_data_parallel_world_size
get_data_parallel_rank = _get_data_parallel_rank


# ---- tensor (model) parallel ------------------------------------------------------------
def get_tensor_model_parallel_group():
    rt = _runtime()
    return rt.comm.tp_group if rt is not None else None


def get_tensor_model_parallel_world_size() -> int:
    rt = _runtime()
    return rt.plan.grid.tp_size if rt is not None else 1


def get_tensor_model_parallel_rank() -> int:
    rt = _runtime()
    return rt.plan.grid.tp_rank(rt.plan.rank) if rt is not None else 0


def get_tensor_model_parallel_src_rank() -> int:
    """The global rank of tensor-parallel rank 0 in this rank's group (Megatron's rule)."""
    size = get_tensor_model_parallel_world_size()
    rank = dist.get_rank() if _initialized() else 0
    return rank // size * size


get_model_parallel_group = get_tensor_model_parallel_group
get_model_parallel_world_size = get_tensor_model_parallel_world_size
get_model_parallel_rank = get_tensor_model_parallel_rank
_get_model_parallel_world_size = get_tensor_model_parallel_world_size


# ---- sequence parallel: none in zerofx ----------------------------------------------------
def _get_sequence_parallel_world_size() -> int:
    return 1


def _get_sequence_parallel_rank() -> int:
    return 0


def _get_sequence_parallel_group():
    return None


_get_sequence_data_parallel_world_size = _get_data_parallel_world_size
_get_sequence_data_parallel_rank = _get_data_parallel_rank
_get_sequence_data_parallel_group = _get_data_parallel_group


def __getattr__(name):
    if "expert" in name:  # _get_expert_parallel_group, _create_expert_and_data_parallel, ...
        raise AttributeError(f"deepspeed.utils.groups.{name}: Mixture-of-Experts (expert "
                             f"parallelism) is not part of zerofx")
    if name == "initialize":
        raise AttributeError("deepspeed.utils.groups.initialize is deprecated in DeepSpeed "
                             "too: pass mpu= to deepspeed.initialize")
    raise AttributeError(f"module 'deepspeed.utils.groups' (zerofx) has no attribute {name!r}")
