"""``deepspeed.comm``: the collectives and helpers DeepSpeed scripts call, on torch.distributed.

DeepSpeed's versions take torch's arguments plus ``prof``, ``log_name`` and ``debug``, which
only feed its communication logger; here they are accepted and change nothing. Rank queries
answer 0 / 1 before a process group exists, as DeepSpeed's do once initialised for one
process.
"""
from __future__ import annotations

import os

import torch.distributed as dist
from torch.distributed import ReduceOp  # noqa: F401  (deepspeed.comm.ReduceOp)

from zerofx.runtime.comm.dist import init_distributed_like_deepspeed as init_distributed  # noqa: F401

_LOGGING = ("prof", "log_name", "debug")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def get_world_group():
    return dist.group.WORLD


def _torch_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _LOGGING}


def barrier(group=None, async_op=False, device_ids=None, **logging):
    if is_initialized():
        return dist.barrier(group=group, async_op=async_op, device_ids=device_ids)
    return None


def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, **logging):
    if not is_initialized():
        return None
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def broadcast(tensor, src, group=None, async_op=False, **logging):
    if not is_initialized():
        return None
    return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def all_gather(tensor_list, tensor, group=None, async_op=False, **logging):
    if not is_initialized():
        tensor_list[0].copy_(tensor)
        return None
    return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


def all_gather_into_tensor(output_tensor, tensor, group=None, async_op=False, **logging):
    if not is_initialized():
        output_tensor.copy_(tensor.reshape(output_tensor.shape))
        return None
    return dist.all_gather_into_tensor(output_tensor, tensor, group=group, async_op=async_op)


def reduce_scatter_tensor(output_tensor, tensor, op=ReduceOp.SUM, group=None, async_op=False,
                          **logging):
    if not is_initialized():
        output_tensor.copy_(tensor.reshape(output_tensor.shape))
        return None
    return dist.reduce_scatter_tensor(output_tensor, tensor, op=op, group=group,
                                      async_op=async_op)


def new_group(ranks=None, **kwargs):
    return dist.new_group(ranks=ranks, **_torch_kwargs(kwargs))
