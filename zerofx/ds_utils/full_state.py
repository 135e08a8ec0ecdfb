"""``deepspeed.utils.safe_get_full_*``: one parameter's whole fp32 value, gradient or optimizer
state, gathered from the ZeRO shards.

    w = safe_get_full_fp32_param(model.fc1.weight)            # every rank calls it
    g = safe_get_full_grad(model.fc1.weight)                  # after backward, before step
    m = safe_get_full_optimizer_state(model.fc1.weight, "exp_avg")

As DeepSpeed's: collectives over the data-parallel group when the state is sharded (every
data-parallel rank must call them, in the same order); fp32 tensors of the parameter's shape
(with zerofx's tensor parallelism, this rank's piece); None for a parameter no zerofx runtime
trains. Unlike DeepSpeed's, they answer at stage 0 too (zerofx keeps an fp32 master there).
The gradient is DeepSpeed's: averaged over the data-parallel ranks and divided by
gradient_accumulation_steps, before clipping, and (fp16) still times the loss scale.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import zerofx.graph_ops as graph_ops
from zerofx.config import ConfigError

OPTIMIZER_STATE = ("exp_avg", "exp_avg_sq")  # the fused Adam/AdamW/Lamb's moments


def _owner(param):
    """(the runtime training ``param``, its plan name) or (None, None)."""
    for rt in graph_ops.registered():
        name = rt.param_name(param)
        if name is not None:
            return rt, name
    return None, None


def _gather(rt, name: str, shard: torch.Tensor) -> torch.Tensor:
    """Parameter ``name``'s elements of ``shard`` (laid out as this rank's partition), whole."""
    plan = rt.plan
    slot = plan.slot(name)
    # on the runtime's device, where its collectives run (a host-offloaded shard is not)
    out = torch.zeros(slot.numel, dtype=torch.float32, device=rt.state.flat_params.device)
    for o in plan.owned_pieces_of(name):
        out[o.start:o.start + o.numel] = shard[o.at:o.at + o.numel]
    if plan.sharded and rt.comm.group is not None:  # each rank holds a disjoint part
        dist.all_reduce(out, group=rt.comm.group)
    return out.view(slot.shape)


@torch.no_grad()
def safe_get_full_fp32_param(param) -> torch.Tensor | None:
    """The fp32 master value of ``param`` (a collective when sharded)."""
    rt, name = _owner(param)
    return None if rt is None else _gather_state(rt, name, "master")


@torch.no_grad()
def safe_get_full_optimizer_state(param, optim_state_key: str) -> torch.Tensor | None:
    """``param``'s optimizer state ``optim_state_key`` ("exp_avg" or "exp_avg_sq" of the
    config's Adam/AdamW/Lamb), whole (a collective when sharded)."""
    rt, name = _owner(param)
    if rt is None:
        return None
    if rt.spec.kind == "torch":
        raise ConfigError(
            f"safe_get_full_optimizer_state: {name} is stepped by the script's own torch "
            f"optimizer, whose state zerofx keeps per shard piece, not by name; use the "
            f"config's optimizer (Adam, AdamW, Lamb) to read moments this way")
    if optim_state_key not in OPTIMIZER_STATE:
        raise ConfigError(f"safe_get_full_optimizer_state(..., {optim_state_key!r}): zerofx's "
                          f"optimizers keep {', '.join(OPTIMIZER_STATE)}")
    return _gather_state(rt, name, optim_state_key)


def _gather_state(rt, name: str, key: str) -> torch.Tensor:
    """Parameter ``name``'s fp32 shard state ``key``, whole (through TrainState's accessor:
    with offload_optimizer the state is not in memory)."""
    with rt.state.optimizer_state("read") as fp32:
        return _gather(rt, name, fp32[key])


@torch.no_grad()
def safe_get_full_grad(param) -> torch.Tensor | None:
    """``param``'s reduced gradient of this accumulation window (see the module doc): valid
    after the backward of the window's last micro-step and before ``engine.step()``, as
    DeepSpeed documents it; elsewhere refused (zerofx reduces only at the boundary, and the
    buffers hold the local sum or the last window's values)."""
    from zerofx.engine_compat import engine_of

    rt, name = _owner(param)
    if rt is None:
        return param.grad
    engine = engine_of(rt)
    if engine is None:
        raise ConfigError("safe_get_full_grad needs the engine of zerofx.initialize (it "
                          "knows where the accumulation window stands); with plain "
                          "torch.compile the gradients are in the runtime's buckets")
    if not engine.gradients_reduced:
        raise ConfigError(
            f"safe_get_full_grad({name}): the gradients are reduced across ranks at the "
            f"accumulation boundary; call it after the backward of the window's last "
            f"micro-step (engine.is_gradient_accumulation_boundary() true) and before "
            f"engine.step()")
    rt.wait_buckets()  # the reductions backward started
    plan, st = rt.plan, rt.state
    divisor = plan.grid.dp_size * rt.gas * rt.pre_reduce  # what the step would divide by
    if plan.reduces_into_shard:
        grad = _gather(rt, name, st.shard_grads)
    else:  # all-reduced: the whole of it on every rank
        slot = plan.slot(name)
        grad = st.full_grads[slot.offset:slot.end].float().view(slot.shape)
    return grad / divisor
