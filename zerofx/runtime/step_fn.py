"""The optimizer step as plain torch code, traced once into the optimizer-step graph.

    wait for the bucket collectives
    → squared gradient norm of this rank's shard, summed over the DP group (one all-reduce)
    → overflow = norm not finite; coefficient = clip / (loss_scale × dp × accumulation)
    → fused Adam/AdamW on the fp32 master shard (skipped on overflow), writing the compute-
      dtype copy → all-gather every bucket's slices back into the model's parameters
    → loss-scale update and skip count, on the device

Everything per-step is a tensor argument, so the traced graph never changes and never reads
a value on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed._functional_collectives as funcol

from zerofx.graph_ops import FINISH_GATHER, SHARD_OPTIMIZER_STEP, START_GATHER, WAIT_BUCKETS
from zerofx.plan import gather_chunks
from zerofx.runtime.comm.forms import Form, form_of
from zerofx.runtime.fused_optim import (adam_step_, grad_sumsq,
                                        lamb_apply_, lamb_moments_, lamb_trust_ratio)
from zerofx.runtime.loss_scaler import LossScaler
from zerofx.runtime.offload.ops import offloaded_update, params_update

# torch 2.13 renamed all_gather_tensor (now deprecated, warning per call); 2.11 lacks the new name.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


@dataclass
class StepState:
    """Every tensor the optimizer-step graph reads or updates, by name: the one contract
    between the runtime (which owns them) and the traced step (which takes them flat, in
    this field order)."""

    shard_grads: torch.Tensor  # this rank's reduced gradient shard (stage 2; else unused)
    full_grads: torch.Tensor  # full gradient buffer (stage 1 copies its part out)
    master: torch.Tensor  # fp32 master weights of the shard
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    shard_lowp: torch.Tensor  # stage 3: this rank's shard of the parameters (else unused)
    flat_params: torch.Tensor  # the model's parameters, one flat buffer
    lr: torch.Tensor
    step: torch.Tensor  # optimizer steps taken (not skipped)
    scale: torch.Tensor  # fp16 loss scale and its schedule's state
    hysteresis: torch.Tensor
    it: torch.Tensor
    last_overflow: torch.Tensor
    skipped: torch.Tensor
    beta1: torch.Tensor  # float64: a schedule (OneCycle) may move it
    floor_hits: torch.Tensor  # overflows at the minimum loss scale
    grad_norm: torch.Tensor  # the step's global norm of the unscaled gradients (inf: overflow)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def traceable(step_fn):
    """``step_fn(StepState)`` as a function of the flat tensors, with the fields' names as
    its parameters, so the traced graph's inputs carry them (dumps show ``master_1``)."""
    names = [f.name for f in fields(StepState)]
    namespace = {"step_fn": step_fn, "StepState": StepState}
    exec(f"def step({', '.join(names)}):\n"  # noqa: S102 - a fixed, local template
         f"    return step_fn(StepState({', '.join(names)}))\n", namespace)
    return namespace["step"]


def make_step_fn(rt):
    """Close a step function over ``rt``'s static facts (plan, optimizer, group)."""
    plan, spec, scaler, comm = rt.plan, rt.spec, rt.state.scaler, rt.comm
    clip = rt.config.clip_norm
    owned, group, sid, norm_group = plan.owned(), comm.group, rt.id, comm.norm_group(plan)
    reduced_in_shard = plan.reduces_into_shard
    dp = plan.grid.dp_size
    chunks = gather_chunks(plan, rt.config)
    gather = form_of("gather", comm.forms["gather"].form if "gather" in comm.forms
                     else "all_gather")
    # Stages 1-2 with an in-place gather (point-to-point, shared memory): the update writes
    # this rank's rows of the flat parameters in place and the exchange fills the other rows
    # there (no shard-sized temporary, no copy of the gathered chunks).
    in_place = plan.sharded and not plan.partitioned and gather.in_place
    update = _make_update(rt, in_place)
    # offload_param nvme (stage 3): the update streams the shard into its file chunk by
    # chunk and leaves only the persistent buckets' rows (the shard's tail) in memory, the
    # step's all-gather source (offload/ops.py)
    store = rt.state.params
    tail_at = store.tail_at if store is not None else 0
    # Gradients arrive summed over DP ranks and accumulation steps, and loss-scaled.
    divisor = float(plan.grid.dp_size * rt.gas) * rt.pre_reduce  # what is left to divide

    def step_fn(state: StepState):
        shard_grads, full_grads, master = state.shard_grads, state.full_grads, state.master
        exp_avg, exp_avg_sq, shard_lowp = state.exp_avg, state.exp_avg_sq, state.shard_lowp
        flat_params, lr, step, scale = state.flat_params, state.lr, state.step, state.scale
        hysteresis, it, last_overflow = state.hysteresis, state.it, state.last_overflow
        skipped, beta1, floor_hits = state.skipped, state.beta1, state.floor_hits
        WAIT_BUCKETS(sid)
        g = shard_grads
        if plan.sharded and not reduced_in_shard:  # stage 1: what this rank owns, a temporary
            g = torch.cat([full_grads[r.start:r.start + r.numel] for r in owned])
        sq = _sumsq(g, plan)
        if norm_group is not None:
            sq = funcol.all_reduce(sq, "sum", norm_group)
        overflow = ~torch.isfinite(sq)
        denom = scale * divisor
        coef = 1.0 / denom
        norm = sq.sqrt() / denom  # the true global norm of the unscaled gradients
        state.grad_norm.copy_(norm)  # before clipping, as DeepSpeed reports it
        if clip > 0:
            coef = coef * torch.clamp(clip / (norm + 1e-6), max=1.0)
        if spec.max_grad_norm > 0:  # LAMB's own clipping, as DeepSpeed's FusedLamb does it
            coef = coef / torch.clamp((norm + 1e-6) / spec.max_grad_norm, min=1.0)
        step.add_((~overflow).float())
        out = flat_params
        if plan.partitioned:  # stage 3: the shard is the parameter
            out = shard_lowp if store is None else \
                shard_lowp.new_empty(store.numel - tail_at)
        elif plan.sharded and not in_place:
            # Stages 1-2, native all-gather: the updated shard in the compute dtype is a step
            # temporary (ZeRO's memory formulas hold no such state), starting from the
            # current values: a skipped update writes nothing, and the all-gather sends them
            # back unchanged.
            out = torch.cat([flat_params[r.start:r.start + r.numel] for r in owned])
        update(master, g, exp_avg, exp_avg_sq, out, lr=lr, step=step, coef=coef,
               skip=overflow.float(), beta1=beta1)
        if plan.sharded:
            _gather_params(out, flat_params, chunks, dp, group, plan.persist_offset,
                           form=gather, sid=sid, at=tail_at)
        LossScaler(scale, hysteresis, it, last_overflow, scaler.dynamic, scaler.window,
                   scaler.delayed_shift, scaler.min_scale, scaler.consecutive_hysteresis,
                   floor_hits).update(overflow)
        skipped.add_(overflow.long())

    return step_fn


def _sumsq(g: torch.Tensor, plan) -> torch.Tensor:
    """This rank's share of the squared global gradient norm: tensor-parallel replicas of a
    weight hold equal gradients, so each counts 1/tp and the TP sum counts it once."""
    tp = plan.grid.tp_size
    if tp == 1:
        return grad_sumsq(g)
    split, whole = _tp_ranges(plan)
    sq = torch.zeros((), dtype=torch.float32, device=g.device)
    for a, b in split:
        sq = sq + grad_sumsq(g[a:b])
    for a, b in whole:
        sq = sq + grad_sumsq(g[a:b]) / tp
    return sq


def _tp_ranges(plan) -> tuple[list, list]:
    """(split, replicated) ranges of this rank's shard, adjacent ranges merged."""
    ranges: dict[bool, list] = {True: [], False: []}
    for o in plan.owned_pieces():
        for split, at, numel in _tp_parts(o, plan.grid.tp_size):
            out = ranges[split]
            if out and out[-1][1] == at:
                out[-1] = (out[-1][0], at + numel)
            else:
                out.append((at, at + numel))
    return ranges[True], ranges[False]


def _tp_parts(o, tp: int):
    """(split, shard offset, numel) of an owned piece: a split weight's whole regions (a
    multi-query key/value beside split query heads, TPShard.regions) are replicated."""
    spans = o.slot.tp.replicated_spans(tp) if o.slot.tp is not None else []
    at, end = o.start, o.start + o.numel
    for a, b in spans:
        a, b = max(a, o.start), min(b, end)
        if a < b:
            if at < a:
                yield True, o.at + at - o.start, a - at
            yield False, o.at + a - o.start, b - a
            at = b
    if at < end:
        yield o.slot.tp_split, o.at + at - o.start, end - at


def _make_update(rt, in_place: bool):
    """The fused update of this rank's shard: Adam/AdamW in one call, LAMB in two passes
    around one all-reduce of per-tensor partial norms (a shard can cut a tensor).

    ``out`` takes the updated compute-dtype values: shard-shaped, or (``in_place``) the
    flat parameters, each owned range written where it lives there."""
    spec, plan, norm_group = rt.spec, rt.plan, rt.comm.norm_group(rt.plan)
    if rt.state.offload is not None:  # on disk or host memory: the same kernels, there
        return offloaded_update(rt.state.offload, kind=spec.kind, hyper=spec.hyper,
                                norm_group=norm_group, in_place=in_place,
                                params_store=rt.state.params)
    if rt.state.params is not None:  # stage 3's shard on NVMe: written chunk by chunk
        return params_update(rt.state.params, kind=spec.kind, hyper=spec.hyper, sid=rt.id,
                             lamb_moments=_lamb_ratios(plan, spec.hyper, norm_group))
    # (shard range, flat-parameter range) per owned bucket range; one range when out is
    # shard-shaped or the shard is everything (stage 0)
    ranges = [(slice(r.at, r.at + r.numel), slice(r.start, r.start + r.numel))
              for r in plan.owned()] if in_place else [(slice(None), slice(None))]
    if spec.kind == "torch":
        sid = rt.id

        def unfused(master, g, m, v, out, *, lr, step, coef, skip, beta1):
            SHARD_OPTIMIZER_STEP(sid, g, coef, lr, skip)
            for sh, fl in ranges:  # unchanged master when skipped: the same values again
                out[fl].copy_(master[sh])
        return unfused

    hyper = spec.hyper
    if spec.kind == "adam":

        def adam(master, g, m, v, out, *, lr, step, coef, skip, beta1):
            for sh, fl in ranges:
                adam_step_(master[sh], g[sh], m[sh], v[sh], lr=lr, step=step, hyper=hyper,
                           grad_scale=coef, skip=skip, param_out=out[fl], beta1=beta1)
        return adam

    starts = [s.offset for s in plan.params] + [plan.padded_numel]
    owned = plan.owned()
    ratios = _lamb_ratios(plan, hyper, norm_group)

    def lamb(master, g, m, v, out, *, lr, step, coef, skip, beta1):
        bounds = torch.tensor(starts, dtype=torch.int64, device=master.device)
        pieces = [(slice(r.at, r.at + r.numel), r.start) for r in owned]
        ratio = ratios(master, g, m, v, coef, skip, beta1)
        for sl, start in pieces:
            dst = out[start:start + (sl.stop - sl.start)] if in_place or not plan.sharded \
                else out[sl]
            lamb_apply_(master[sl], m[sl], v[sl], bounds, ratio, lr=lr, step=step,
                        hyper=hyper, skip=skip, shard_offset=start, param_out=dst,
                        beta1=beta1)
    return lamb


def _lamb_ratios(plan, hyper, norm_group):
    """LAMB's first pass over the in-memory shard (new moments, per-tensor partial sums),
    the sums all-reduced: ``ratios(master, g, m, v, coef, skip, beta1)``, the trust
    ratios of whole tensors."""
    # Tensor i spans flat[starts[i]:starts[i+1]]; bucket padding joins the tensor before it
    # (its weights and gradients are zero, so it adds nothing to either norm).
    starts = [s.offset for s in plan.params] + [plan.padded_numel]
    owned = plan.owned()
    # norm_group spans the TP group too: a split tensor's sums add up over its pieces. A
    # replicated tensor's sums come tp times over, both of them: the ratio is unchanged.

    def ratios(master, g, m, v, coef, skip, beta1):
        bounds = torch.tensor(starts, dtype=torch.int64, device=master.device)
        pieces = [(slice(r.at, r.at + r.numel), r.start) for r in owned]
        sums = sum(lamb_moments_(master[sl], g[sl], m[sl], v[sl], bounds, hyper=hyper,
                                 grad_scale=coef, skip=skip, shard_offset=start, beta1=beta1)
                   for sl, start in pieces)
        if norm_group is not None:
            sums = funcol.all_reduce(sums, "sum", norm_group)
        return lamb_trust_ratio(sums, hyper=hyper)
    return ratios


def _gather_params(shard_lowp, flat_params, chunks, dp: int, group, base: int, *,
                   form: Form, sid: int, at: int = 0) -> None:
    """All-gather every chunk of this rank's updated slices into the flat parameters.

    A chunk's slices are contiguous in the shard, so one collective gathers them; the result
    is rank-major ([rank][bucket slice]) and each bucket is copied to its bucket-major place.
    ``form``: the functional all-gather, or (``p2p``, timed faster on gloo) zerofx's
    start_gather/finish_gather ops, which exchange the rows in place in ``flat_params``
    (runtime/comm/forms.StepGathers); every chunk starts before the first is waited on.
    ``at``: the shard offset ``shard_lowp`` starts at (offload_param: only the tail).
    """
    if form.in_place:
        if shard_lowp is not flat_params:  # stage 3's persistent buckets: rows from the shard
            for r, _ in (rb for chunk in chunks for rb in chunk):
                flat_params[r.start - base:r.start - base + r.numel].copy_(
                    shard_lowp[r.at - at:r.at - at + r.numel])
        for i in range(len(chunks)):
            START_GATHER(sid, flat_params, i)
        for i, chunk in enumerate(chunks):
            FINISH_GATHER(sid, flat_params, i, dp * sum(r.numel for r, _ in chunk))
        return
    issued = []  # every chunk's all-gather starts before the first is waited on
    for chunk in chunks:
        first, last = chunk[0][0], chunk[-1][0]
        src = shard_lowp[first.at - at:last.at - at + last.numel]
        issued.append((_all_gather(src, 0, group), src.numel()))
    for chunk, (gathered, numel) in zip(chunks, issued):
        gathered = gathered.view(dp, numel)  # waits for this chunk only
        first = chunk[0][0]
        for r, b in chunk:
            off = r.at - first.at
            flat_params[b.offset - base:b.offset - base + b.padded].view(dp, r.numel).copy_(
                gathered[:, off:off + r.numel])
