"""The optimizer-step graph's view of offloaded state: its ops and the update using them.

With ``offload_optimizer.device: nvme`` the step graph is the in-memory one except at the
update, where the fused kernels' calls on the in-memory shard become::

    Adam:  zerofx.offload_adam_(oid, g, out, lr, step, coef, skip, beta1, in_place)
    LAMB:  sums = zerofx.offload_lamb_moments(oid, g, coef, skip, beta1)
           sums = all_reduce(sums)                         (functional, as in memory)
           zerofx.offload_lamb_apply_(oid, trust_ratio(sums), out, lr, step, skip, beta1,
                                      in_place)

``oid`` names the OffloadedState (offload/state.py's table); the ops stream the state from disk
and write the compute-dtype values into ``out`` (declared mutated, so the schedule pass's
alias analysis sees the write). The rest of the step graph (norm, overflow, clip, gathers,
loss scale) is unchanged. With ``offload_param.device: nvme`` (stage 3) the shard the update
writes is ``zerofx.offload_params_read(pid, shard_lowp)`` (read from its file) and goes back
with ``zerofx.offload_params_write(pid, shard, skip)`` after the step's gathers. These ops
belong to the runtime, like the fused kernels' ops (runtime/optim_ops.py): only the step
function calls them, no pass builds them.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch.fx.node import has_side_effect

from zerofx.runtime.fused_optim import lamb_trust_ratio
from zerofx.runtime.offload import params
from zerofx.runtime.offload.state import lookup


@torch.library.custom_op("zerofx::offload_adam_", mutates_args=("out",))
def offload_adam_(oid: int, grad: torch.Tensor, out: torch.Tensor, lr: torch.Tensor,
                  step: torch.Tensor, coef: torch.Tensor, skip: torch.Tensor,
                  beta1: torch.Tensor, in_place: bool) -> None:
    """Fused Adam/AdamW over the offloaded shard (unless ``skip``), writing ``out``."""
    lookup(oid).adam(grad, out, lr=lr, step=step, coef=coef, skip=skip, beta1=beta1,
                     in_place=in_place)


@offload_adam_.register_fake
def _(oid, grad, out, lr, step, coef, skip, beta1, in_place):
    return None


@torch.library.custom_op("zerofx::offload_lamb_moments", mutates_args=())
def offload_lamb_moments(oid: int, grad: torch.Tensor, coef: torch.Tensor, skip: torch.Tensor,
                         beta1: torch.Tensor) -> torch.Tensor:
    """LAMB pass 1 over the offloaded shard (moments written back); [2, T] partial sums."""
    return lookup(oid).lamb_moments(grad, coef=coef, skip=skip, beta1=beta1)


@offload_lamb_moments.register_fake
def _(oid, grad, coef, skip, beta1):
    return grad.new_empty((2, lookup(oid).num_tensors), dtype=torch.float32)


@torch.library.custom_op("zerofx::offload_lamb_apply_", mutates_args=("out",))
def offload_lamb_apply_(oid: int, ratio: torch.Tensor, out: torch.Tensor, lr: torch.Tensor,
                        step: torch.Tensor, skip: torch.Tensor, beta1: torch.Tensor,
                        in_place: bool) -> None:
    """LAMB pass 2 over the offloaded shard (master weights written back), writing ``out``."""
    lookup(oid).lamb_apply(ratio, out, lr=lr, step=step, skip=skip, beta1=beta1,
                           in_place=in_place)


@offload_lamb_apply_.register_fake
def _(oid, ratio, out, lr, step, skip, beta1, in_place):
    return None


@torch.library.custom_op("zerofx::offload_params_read", mutates_args=())
def offload_params_read(pid: int, like: torch.Tensor) -> torch.Tensor:
    """Stage 3's offloaded 16-bit shard (offload/params.py), read whole for the step;
    ``like``: the empty in-memory shard, for the dtype and device."""
    return params.lookup(pid).read_all()


@offload_params_read.register_fake
def _(pid, like):
    return like.new_empty(params.lookup(pid).numel)


@torch.library.custom_op("zerofx::offload_params_write", mutates_args=())
def offload_params_write(pid: int, shard: torch.Tensor, skip: torch.Tensor) -> None:
    """The updated shard back to its file (nothing on a skipped step: it is unchanged)."""
    if not float(skip):
        params.lookup(pid).write_all(shard)


@offload_params_write.register_fake
def _(pid, shard, skip):
    return None


# They change the state on disk: never dead code, whatever uses their outputs.
for _op in (torch.ops.zerofx.offload_adam_.default,
            torch.ops.zerofx.offload_lamb_moments.default,
            torch.ops.zerofx.offload_lamb_apply_.default,
            torch.ops.zerofx.offload_params_write.default):
    has_side_effect(_op)


def offloaded_update(offload, *, kind: str, hyper, norm_group, in_place: bool):
    """The step function's ``update`` (runtime/step_fn.py) for an offloaded state: the same
    signature; the in-memory master and moments it is handed are empty and unused."""
    oid = offload.id
    if kind == "adam":
        def adam(master, g, m, v, out, *, lr, step, coef, skip, beta1):
            torch.ops.zerofx.offload_adam_(oid, g, out, lr, step, coef, skip, beta1, in_place)
        return adam

    def lamb(master, g, m, v, out, *, lr, step, coef, skip, beta1):
        sums = torch.ops.zerofx.offload_lamb_moments(oid, g, coef, skip, beta1)
        if norm_group is not None:
            sums = funcol.all_reduce(sums, "sum", norm_group)
        ratio = lamb_trust_ratio(sums, hyper=hyper)
        torch.ops.zerofx.offload_lamb_apply_(oid, ratio, out, lr, step, skip, beta1, in_place)
    return lamb
