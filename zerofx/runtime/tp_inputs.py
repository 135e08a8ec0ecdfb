"""The ranks of a tensor-parallel group must be fed the same batch.

They compute one model together, each with its pieces of the weights: a rank given another
batch (data sharded by global rank instead of data-parallel rank, a sampler seeded per
process) makes every activation a mix of two batches, and training goes on with a wrong loss
and no error. The engine compares a checksum of its first calls' inputs across the group
(one 2-element all-reduce) and refuses a mismatch, naming the fix.
"""
from __future__ import annotations

import zlib

import torch

from zerofx.config import ConfigError
from zerofx.runtime.comm.dist import same_on_every_rank


def _checksum(args, kwargs) -> int:
    crc = 0
    leaves = torch.utils._pytree.tree_leaves((args, sorted(kwargs.items())))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().contiguous().cpu()
            crc = zlib.crc32(repr((tuple(t.shape), str(t.dtype))).encode(), crc)
            crc = zlib.crc32(t.view(-1).view(torch.uint8).numpy().tobytes(), crc)
        elif isinstance(leaf, (int, float, bool, str, type(None))):
            crc = zlib.crc32(repr(leaf).encode(), crc)
    return crc


def check_same_inputs(rt, args, kwargs) -> None:
    """Refuse, on every rank of the tensor-parallel group, inputs that differ within it."""
    if rt.comm.tp_group is None:
        return
    if not same_on_every_rank(_checksum(args, kwargs), rt.comm.tp_group, rt.device):
        grid = rt.plan.grid
        raise ConfigError(
            f"the {grid.tp_size} tensor-parallel ranks of this group were given different "
            f"inputs; they compute one model together and must see the same batch. Shard "
            f"the data by data-parallel rank (engine.dp_rank, here {grid.dp_rank(rt.plan.rank)}"
            f" of {grid.dp_size}), not by global rank, or pass training_data= to "
            f"zerofx.initialize, whose loader does")
