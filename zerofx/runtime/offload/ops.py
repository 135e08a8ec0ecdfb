"""The optimizer-step graph's view of offloaded state: its ops and the update using them.

With ``offload_optimizer.device: nvme`` the step graph is the in-memory one except at the
update, where the fused kernels' calls on the in-memory shard become::

    Adam:  zerofx.offload_adam_(oid, g, out, lr, step, coef, skip, beta1, in_place, pid)
    LAMB:  sums = zerofx.offload_lamb_moments(oid, g, coef, skip, beta1)
           sums = all_reduce(sums)                         (functional, as in memory)
           zerofx.offload_lamb_apply_(oid, trust_ratio(sums), out, lr, step, skip, beta1,
                                      in_place, pid)

``oid`` names the OffloadedState (offload/state.py's table); the ops stream the state from disk
and write the compute-dtype values into ``out`` (declared mutated, so the schedule pass's
alias analysis sees the write). The rest of the step graph (norm, overflow, clip, gathers,
loss scale) is unchanged.

With ``offload_param.device: nvme`` (stage 3, ``pid`` names the ParamStore, else -1) no
shard-sized 16-bit tensor exists at the step: the update writes each chunk's values into
a chunk buffer that goes to the parameter file (offload/params.py's StepWriter), and ``out``
is the shard's persistent tail, which the step's all-gather sends (read from the file on a
skipped step). With the optimizer state in memory the fused update runs through
``zerofx.offload_params_update_(pid, kind, master, g, m, v, tail, ratio, lr, step, coef,
skip, beta1)`` chunk by chunk (LAMB: its first pass and the all-reduce as in memory; the
trust ratios are whole-tensor, so the second pass is elementwise and any cut gives the
same bits); the gradient norm and clipping coefficient come before, from the gradients.
These ops belong to the runtime, like the fused kernels' ops (runtime/optim_ops.py): only
the step function calls them, no pass builds them.
"""
from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.distributed._functional_collectives as funcol
from torch.fx.node import has_side_effect

from zerofx.runtime.fused_optim import adam_step_, lamb_apply_, lamb_trust_ratio
from zerofx.runtime.offload import params
from zerofx.runtime.offload.state import lookup


@torch.library.custom_op("zerofx::offload_adam_", mutates_args=("out",))
def offload_adam_(oid: int, grad: torch.Tensor, out: torch.Tensor, lr: torch.Tensor,
                  step: torch.Tensor, coef: torch.Tensor, skip: torch.Tensor,
                  beta1: torch.Tensor, in_place: bool, pid: int) -> None:
    """Fused Adam/AdamW over the offloaded shard (unless ``skip``), writing ``out`` (with
    ``pid``: the parameter file, ``out`` the tail)."""
    st = lookup(oid)
    _update(partial(st.adam, grad, lr=lr, step=step, coef=coef, skip=skip, beta1=beta1),
            out, in_place, pid, skip, st)


@offload_adam_.register_fake
def _(oid, grad, out, lr, step, coef, skip, beta1, in_place, pid):
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
                        in_place: bool, pid: int) -> None:
    """LAMB pass 2 over the offloaded shard (master weights written back), writing ``out``
    (with ``pid``: as offload_adam_)."""
    st = lookup(oid)
    _update(partial(st.lamb_apply, ratio, lr=lr, step=step, skip=skip, beta1=beta1),
            out, in_place, pid, skip, st)


def _update(apply, out, in_place: bool, pid: int, skip, st) -> None:
    """Run an offloaded state's update ``apply(out, in_place=, sink=)`` writing ``out`` (no
    parameter file: ``pid`` < 0), or each of ``st``'s chunks into the parameter file's
    StepWriter with ``out`` the persistent tail (nothing at all on a skipped step). Only the
    NVMe state has chunks: ``st.chunks`` is read on that branch alone (HostOffload has none)."""
    if pid < 0:
        apply(out, in_place=in_place)
        return
    with _streamed(pid, out, skip, st.chunks) as sink:
        if sink is not None:
            apply(out, in_place=False, sink=sink)


@offload_lamb_apply_.register_fake
def _(oid, ratio, out, lr, step, skip, beta1, in_place, pid):
    return None


# ParamStore -> (kind, hyper, tensor bounds) of the in-memory optimizer updating it
_UPDATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.library.custom_op("zerofx::offload_params_update_",
                         mutates_args=("master", "exp_avg", "exp_avg_sq", "tail"))
def offload_params_update_(pid: int, master: torch.Tensor, grad: torch.Tensor,
                           exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                           tail: torch.Tensor, ratio: torch.Tensor, lr: torch.Tensor,
                           step: torch.Tensor, coef: torch.Tensor, skip: torch.Tensor,
                           beta1: torch.Tensor) -> None:
    """The in-memory fused update of the shard (Adam: the whole step; LAMB: pass 2 with
    ``ratio``; torch: the master already updated, copied) chunk by chunk, each chunk's
    16-bit values to the parameter file and the persistent rows to ``tail``."""
    store = params.lookup(pid)
    kind, hyper, bounds = _UPDATES[store]
    with _streamed(pid, tail, skip, store.chunks) as sink:
        if sink is None:
            return
        for (a, b), segments in zip(store.chunks, store.segments):
            dst = sink.begin(a, b)
            for lo, hi, flat in segments:
                o, sl = dst[lo - a:hi - a], slice(lo, hi)
                if kind == "adam":
                    adam_step_(master[sl], grad[sl], exp_avg[sl], exp_avg_sq[sl], lr=lr,
                               step=step, hyper=hyper, grad_scale=coef, skip=skip,
                               param_out=o, beta1=beta1)
                elif kind == "lamb":
                    lamb_apply_(master[sl], exp_avg[sl], exp_avg_sq[sl], bounds, ratio, lr=lr,
                                step=step, hyper=hyper, skip=skip, shard_offset=flat,
                                param_out=o, beta1=beta1)
                else:
                    o.copy_(master[sl])
            sink.end(a, b)


@offload_params_update_.register_fake
def _(pid, master, grad, exp_avg, exp_avg_sq, tail, ratio, lr, step, coef, skip, beta1):
    return None


class _streamed:
    """``with _streamed(pid, tail, skip, chunks) as sink``: the store's StepWriter for an
    applied step; None on a skipped one, whose tail is then read from the file (nothing
    is written: the shard is unchanged)."""

    def __init__(self, pid: int, tail: torch.Tensor, skip: torch.Tensor, chunks):
        self.store, self.tail, self.chunks = params.lookup(pid), tail, chunks
        self.skip, self.ctx = bool(float(skip)), None

    def __enter__(self):
        if self.skip:
            self.store.read_tail(self.tail)
            return None
        self.ctx = self.store.step_writer(self.tail, self.chunks)
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        return False if self.ctx is None else self.ctx.__exit__(*exc)


# They change the state on disk: never dead code, whatever uses their outputs.
for _op in (torch.ops.zerofx.offload_adam_.default,
            torch.ops.zerofx.offload_lamb_moments.default,
            torch.ops.zerofx.offload_lamb_apply_.default,
            torch.ops.zerofx.offload_params_update_.default):
    has_side_effect(_op)


def offloaded_update(offload, *, kind: str, hyper, norm_group, in_place: bool,
                     params_store=None):
    """The step function's ``update`` (runtime/step_fn.py) for an offloaded state: the same
    signature; the in-memory master and moments it is handed are empty and unused. With
    ``params_store`` (offload_param nvme) ``out`` is the shard's persistent tail."""
    oid, pid = offload.id, params_store.id if params_store is not None else -1
    if kind == "adam":
        def adam(master, g, m, v, out, *, lr, step, coef, skip, beta1):
            torch.ops.zerofx.offload_adam_(oid, g, out, lr, step, coef, skip, beta1, in_place,
                                           pid)
        return adam

    def lamb(master, g, m, v, out, *, lr, step, coef, skip, beta1):
        sums = torch.ops.zerofx.offload_lamb_moments(oid, g, coef, skip, beta1)
        if norm_group is not None:
            sums = funcol.all_reduce(sums, "sum", norm_group)
        ratio = lamb_trust_ratio(sums, hyper=hyper)
        torch.ops.zerofx.offload_lamb_apply_(oid, ratio, out, lr, step, skip, beta1, in_place,
                                             pid)
    return lamb


def params_update(store, *, kind: str, hyper, lamb_moments, sid: int):
    """The step function's ``update`` with the optimizer state in memory and stage 3's
    shard on NVMe: ``out`` is the shard's persistent tail. ``lamb_moments(master, g, m, v,
    coef, skip, beta1)``: LAMB's first pass and all-reduce as in memory (the ratios);
    ``sid``: the runtime, whose torch optimizer SHARD_OPTIMIZER_STEP runs first."""
    from zerofx.graph_ops import SHARD_OPTIMIZER_STEP

    bounds = [s.offset for s in store.plan.params] + [store.plan.padded_numel]
    _UPDATES[store] = (kind, hyper, torch.tensor(bounds, dtype=torch.int64))
    pid = store.id

    def update(master, g, m, v, out, *, lr, step, coef, skip, beta1):
        ratio = g.new_empty(0, dtype=torch.float32)
        if kind == "lamb":
            ratio = lamb_moments(master, g, m, v, coef, skip, beta1)
        elif kind == "torch":
            SHARD_OPTIMIZER_STEP(sid, g, coef, lr, skip)
        torch.ops.zerofx.offload_params_update_(pid, master, g, m, v, out, ratio, lr, step,
                                                coef, skip, beta1)
    return update
