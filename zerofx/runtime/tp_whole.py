"""Whole weights from tensor-parallel pieces, for files a single process will read.

zerofx splits weights itself (the tensor_parallel pass), so the model the user wrote is
whole: a 16-bit model file must hold whole weights, loadable with ``load_state_dict`` or
``from_pretrained`` into the unsplit model. Each split weight is all-gathered over the
tensor-parallel group and its pieces put back where ``TPShard.local_piece`` took them
(a fused q|k|v part by part). Weights an ``mpu`` split (a Megatron model) stay as the
model holds them, as DeepSpeed saves them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def whole_state(rt, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a state_dict of the model: this rank's pieces) with every weight zerofx
    split replaced by the whole weight; a collective over the tensor-parallel group."""
    if rt.comm.tp_group is None:
        return state
    tp = rt.plan.grid.tp_size
    names = {}  # every name the state dict may use for a split weight -> its slot
    for s in rt.plan.params:
        if s.tp is not None:
            for n in (s.name, *rt.aliases.get(s.name, ())):
                names[n] = s
    out = dict(state)
    done: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in state if k in names):  # one order on every rank
        s = names[key]
        if s.name not in done:
            local = state[key].contiguous()
            pieces = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(pieces, local, group=rt.comm.tp_group)
            done[s.name] = s.tp.whole(pieces)
        out[key] = done[s.name]
    return out
