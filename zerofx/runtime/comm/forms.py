"""Collective forms: one result, several ways to move its bytes; each timed once on this
machine's group, the fastest used.

    role     form            how
    reduce   reduce_scatter  the native collective
             all_reduce      the whole bucket all-reduced, this rank keeps its piece (gloo's
                             reduce-scatter is an all-reduce plus a copy)
             p2p             each piece sent to the rank that owns it, summed there
             shm             through shared memory (runtime/comm/shm.py; ranks on one host)
    gather   all_gather      the native collective
             p2p             this rank's piece sent to every other rank directly
             shm             through shared memory

Every candidate gives the native form's bits, so the choice changes time, never results:
``p2p`` and ``shm`` reduce are offered at 2 ranks only, where their one addition per element
is the all-reduce's (at more ranks the order of the additions would differ). The ranks time each
candidate on the group at the size it will move (median of REPS after a warm-up, each
sample started together), agree on the slowest rank's times (one all-reduce) and all pick
the same form. Only gloo is timed; nccl's native collectives are used as they are.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zerofx.comm_cost import CommCost, fitted
from zerofx.config import ConfigError
from zerofx.runtime.comm import form_cache
from zerofx.runtime.comm import shm as shm_comm
from zerofx.runtime.comm.dist import from_first_rank
from zerofx.runtime.comm.pending import Pending
from zerofx.plan import gather_chunks

# torch 2.13 renamed reduce_scatter_tensor and all_gather_into_tensor (deprecated, a warning
# per call); 2.11 lacks the new names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REPS = 3
# Timed at most at this many elements: the forms' order does not change beyond it, and a
# model-sized bucket would cost seconds and its size again in memory at startup.
PROBE_CAP = 1 << 24


@dataclass(frozen=True)
class Form:
    """One way to carry out a role's collective: the one object a new form adds."""

    role: str  # "reduce" (gradient bucket -> this rank's shard) or "gather" (shards -> all)
    name: str  # as zerofx.reduce_form / gather_form name it
    kind: str  # what comm_cost predicts and the dumps call it
    start: Callable[..., Pending]  # see start_reduce / start_gather
    native: bool = False  # torch.distributed's own collective (used untimed off gloo)
    pairwise: bool = False  # sums at one rank pair only (offered at 2 ranks: same bits)
    shared_memory: bool = False  # offered only where every rank maps one /dev/shm file
    in_place: bool = False  # a gather that fills the flat parameters' rows in place (the
    # step runs it through zerofx.start_gather / finish_gather, runtime/comm/forms.StepGathers)

    def offered(self, world: int, shm: bool) -> bool:
        """Whether this form is a candidate at ``world`` ranks (``shm``: every rank of the
        group is on this host, shm_comm.available)."""
        return (shm or not self.shared_memory) and (world == 2 or not self.pairwise)


REGISTRY: dict[tuple[str, str], Form] = {}  # (role, name) -> Form, in preference order


def register_form(form: Form) -> Form:
    REGISTRY[form.role, form.name] = form
    return form


def form_of(role: str, name: str) -> Form:
    try:
        return REGISTRY[role, name]
    except KeyError:
        raise ValueError(f"unknown {role} form {name!r}") from None


def candidates(role: str, world: int, shm: bool = False) -> tuple[str, ...]:
    """The forms ``role`` may take at ``world`` ranks, natives first."""
    return tuple(f.name for (r, _), f in REGISTRY.items() if r == role and f.offered(world, shm))


def start_reduce(form: str, flat: torch.Tensor, out: torch.Tensor, group, *, mirror=None,
                 key: int = 0, base: int = 0) -> Pending:
    """Sum ``flat`` ([world x k] elements) over ``group``; this rank's k-element piece of the
    sum lands in ``out`` once the returned Pending is waited on. ``flat`` may be clobbered.
    The ``shm`` form goes through ``mirror`` (shm_comm.ShmMirror): round ``key``, ``flat``
    at ``base`` there."""
    return form_of("reduce", form).start(flat, out, group, mirror=mirror, key=key, base=base)


def start_gather(form: str, src: torch.Tensor, out: torch.Tensor, group, *, mirror=None,
                 key: int = 0, base: int = 0) -> Pending:
    """``out`` ([world x k]) gets every rank's k-element ``src``, in rank order (``shm``:
    through ``mirror``, as start_reduce)."""
    return form_of("gather", form).start(src, out, group, mirror=mirror, key=key, base=base)


def _reduce_native(flat, out, group, **_):
    return Pending([_reduce_scatter(out, flat, group=group, async_op=True)])


def _reduce_all_reduce(flat, out, group, **_):
    rows = flat.view(dist.get_world_size(group), -1)
    return Pending([dist.all_reduce(flat, group=group, async_op=True)],
                   lambda: out.copy_(rows[dist.get_rank(group)]))


def _reduce_p2p(flat, out, group, **_):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world != 2:
        raise ConfigError(f"the p2p reduce form needs 2 data-parallel ranks (it sums in "
                          f"another order than the all-reduce at {world}); use fastest")
    rows = flat.view(world, -1)
    peer = dist.get_process_group_ranks(group)[1 - rank]
    recv = torch.empty_like(out)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, rows[1 - rank], peer, group),
                                    dist.P2POp(dist.irecv, recv, peer, group)])
    return Pending(works, lambda: torch.add(rows[rank], recv, out=out))


def _reduce_shm(flat, out, group, *, mirror, key, base):
    return shm_comm.start_reduce(mirror, key, base, flat, out)


def _gather_native(src, out, group, **_):
    return Pending([all_gather_into(out, src, group=group, async_op=True)])


def _gather_p2p(src, out, group, **_):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows, ranks = out.view(world, -1), dist.get_process_group_ranks(group)
    rows[rank].copy_(src)
    ops = [dist.P2POp(dist.isend, src, ranks[p], group) for p in range(world) if p != rank]
    ops += [dist.P2POp(dist.irecv, rows[p], ranks[p], group) for p in range(world) if p != rank]
    return Pending(dist.batch_isend_irecv(ops))


def _gather_shm(src, out, group, *, mirror, key, base):
    out.view(mirror.world, -1)[mirror.rank].copy_(src)
    return shm_comm.start_gather(mirror, key, [(base, out)])


for _form in (
    Form("reduce", "reduce_scatter", "reduce_scatter", _reduce_native, native=True),
    # gloo's reduce-scatter is an all-reduce plus a copy
    Form("reduce", "all_reduce", "all_reduce", _reduce_all_reduce),
    Form("reduce", "p2p", "p2p_reduce", _reduce_p2p, pairwise=True),
    Form("reduce", "shm", "shm_reduce", _reduce_shm, pairwise=True, shared_memory=True),
    Form("gather", "all_gather", "all_gather", _gather_native, native=True),
    Form("gather", "p2p", "p2p_gather", _gather_p2p, in_place=True),
    Form("gather", "shm", "shm_gather", _gather_shm, shared_memory=True, in_place=True),
):
    register_form(_form)


@dataclass(frozen=True)
class Choice:
    """The form one role's collectives take, and what timing each candidate showed."""

    role: str  # "reduce" (gradient bucket -> this rank's shard) or "gather" (shards -> all)
    form: str
    numel: int  # elements one call moves (what was timed, capped at PROBE_CAP)
    times_ms: tuple[tuple[str, float], ...] = ()  # (form, ms), slowest rank; () not timed
    why: str = ""  # how the form was chosen

    def describe(self) -> str:
        timed = ", ".join(f"{f} {ms:.2f} ms" for f, ms in self.times_ms)
        return f"{self.role}: {self.form} ({self.why}{'; ' + timed if timed else ''})"


def kind_of(role: str, name: str) -> str:
    """The cost model's kind of ``role``'s form ``name`` (stage 3's "param_gather" and a
    logged "stage3 gather" are gathers)."""
    return form_of("reduce" if role.split()[-1] == "reduce" else "gather", name).kind


def choose(role: str, group, numel: int, dtype: torch.dtype, *, pinned: str = "fastest",
           shm: bool = False) -> Choice:
    """The form ``role``'s collectives of ``numel`` elements take on ``group`` (a collective:
    every rank of the group calls it with the same arguments)."""
    world = dist.get_world_size(group)
    forms = candidates(role, world, shm)
    if pinned != "fastest":
        if pinned not in forms:
            where = "" if shm else (" here (shm needs CPU tensors over gloo, every rank on "
                                    "one x86-64 host, and room in /dev/shm)")
            raise ConfigError(f"zerofx.{role}_form: {pinned!r} is not a form of this role at "
                              f"{world} ranks{where} (one of {', '.join(forms)}, or fastest)")
        return Choice(role, pinned, numel, why="set in the config")
    if dist.get_backend(group) != "gloo":
        return Choice(role, forms[0], numel, why=f"{dist.get_backend(group)}'s native "
                                                  f"collective, not timed")
    per = max(1, min(numel, PROBE_CAP) // world)
    # rank 0's cached choice for this host and size, if an earlier run timed it: every
    # rerun then takes the same form (runtime/comm/form_cache.py)
    key = form_cache.key_of(role, forms, world, "gloo", per * world, dtype)
    cached = from_first_rank(lambda: form_cache.load(key), group)
    if cached is not None and cached["form"] in forms:
        times = tuple((f, float(t)) for f, t in cached["times_ms"])
        return Choice(role, cached["form"], per * world, times,
                      why="fastest timed on this host by an earlier run, cached")
    mine = [_time_form(role, f, per, world, dtype, group) for f in forms]
    agreed = torch.tensor(mine, dtype=torch.float64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)  # the slowest rank decides
    times = tuple((f, round(float(t), 3)) for f, t in zip(forms, agreed))
    best = min(times, key=lambda ft: ft[1])[0]
    if dist.get_rank(group) == 0:
        form_cache.store(key, best, times)
    return Choice(role, best, per * world, times, why="fastest timed on this group")


def choose_forms(plan, config, group, *, reduces_into_shard: bool,
                 device: torch.device) -> dict[str, Choice]:
    """{role: Choice} for what this runtime moves over its data-parallel ``group``: stage 2's
    bucket reductions (at the largest bucket's size) and stages 1-2's step all-gathers (at
    the largest chunk's). Every rank computes the same roles in the same order."""
    if group is None or not plan.sharded:
        return {}
    dtype, forms = plan.compute_dtype, {}
    # room for both roles' mirrors (shm_mirrors) and the largest timing probe
    shm = shm_comm.available(group, (2 * dtype.itemsize + plan.grad_dtype.itemsize)
                             * plan.padded_numel, device)
    if reduces_into_shard:
        forms["reduce"] = choose("reduce", group, max(b.padded for b in plan.buckets),
                                 role_dtype(plan, "reduce"), pinned=config.zerofx.reduce_form,
                                 shm=shm)
    chunks = gather_chunks(plan, config)
    if chunks:
        numel = max(sum(b.padded for _, b in c) for c in chunks)
        forms["gather"] = choose("gather", group, numel, dtype, pinned=config.zerofx.gather_form,
                                 shm=shm)
    return forms


def choose_param_gather(plan, config, group, device: torch.device) -> dict[str, Choice]:
    """Stage 3: {"param_gather": Choice} for the graphs' bucket all-gathers on the gather
    ``group`` (timed at the largest gathered bucket; zerofx.gather_form pins it too); {}
    when every bucket is kept whole."""
    sizes = [b.padded for b in plan.buckets if b.offset < plan.persist_offset]
    if group is None or not plan.partitioned or not sizes:
        return {}
    dtype = plan.compute_dtype
    shm = shm_comm.available(group, 3 * plan.padded_numel * dtype.itemsize, device)
    return {"param_gather": choose("gather", group, max(sizes), dtype,
                                   pinned=config.zerofx.gather_form, shm=shm)}


def shm_mirrors(plan, config, forms: dict[str, Choice], group,
                gather_group) -> dict[str, object]:
    """{role: ShmMirror} for the roles whose form is ``shm``: the reduce mirror spans the
    gradient buckets (keyed by bucket) and the gather mirror the flat parameters the step
    gathers (keyed by chunk), both on ``group``; the param_gather mirror stage 3's gathered
    buckets (keyed by bucket), on ``gather_group``. A collective, like choose_forms."""
    nb = len(plan.buckets)
    groups = {"reduce": group, "gather": group, "param_gather": gather_group}
    layout = {"reduce": (plan.padded_numel, nb),
              "gather": (plan.padded_numel - plan.persist_offset,
                         len(gather_chunks(plan, config))),
              "param_gather": (plan.persist_offset, nb)}
    mirrors = {}
    for role, choice in forms.items():
        if choice.form == "shm":
            numel, keys = layout[role]
            mirrors[role] = shm_comm.ShmMirror(groups[role], numel, role_dtype(plan, role),
                                               keys)
    return mirrors


def role_dtype(plan, role: str) -> torch.dtype:
    """What a role moves: gradients (reduce) in the plan's gradient dtype, parameters in
    the compute dtype."""
    return plan.grad_dtype if role == "reduce" else plan.compute_dtype


def cost_of(forms: dict[str, Choice], plan) -> CommCost:
    """The dump's cost model, from what ``forms`` timed (zerofx/comm_cost.py)."""
    return fitted([(kind_of(c.role, f), c.numel * role_dtype(plan, c.role).itemsize, ms)
                   for c in forms.values() for f, ms in c.times_ms])


def _time_form(role, form, per, world, dtype, group) -> float:
    """Median ms of one ``form`` call moving ``per`` x ``world`` elements."""
    flat = torch.ones(world * per, dtype=dtype)
    piece = torch.ones(per, dtype=dtype)
    mirror = shm_comm.ShmMirror(group, world * per, dtype, 1) if form == "shm" else None
    samples = []
    for _ in range(REPS + 1):
        dist.barrier(group=group)  # every rank starts the sample together
        t0 = time.perf_counter()
        if role == "reduce":
            start_reduce(form, flat, piece, group, mirror=mirror).wait()
        else:
            start_gather(form, piece, flat, group, mirror=mirror).wait()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples[1:])


class StepGathers:
    """The optimizer step's all-gathers in the ``p2p`` or ``shm`` form, in flight by chunk,
    straight into the flat parameters: each bucket's rows there are [rank][slice], so this rank
    sends its own row (the update wrote it in place) and receives every other rank's row
    where it belongs. No gathered copy and no second copy into the parameters, which the
    native all-gather's rank-major result needs. The step graph starts every chunk
    (``zerofx.start_gather``) before it waits for the first (``zerofx.finish_gather``)."""

    def __init__(self, group, chunks: list[list[tuple]], base: int, log=None, mirror=None):
        self.group, self.chunks, self.base = group, chunks, base  # chunks: step_fn's
        self.log = log  # runtime/comm/log.CommLog or None
        self.mirror = mirror  # the shm form's ShmMirror, or None: point-to-point
        self._inflight: dict[int, Pending] = {}

    def start(self, chunk: int, flat: torch.Tensor) -> None:
        numel = sum(b.padded for _, b in self.chunks[chunk])
        if self.mirror is not None:  # the same rows, through shared memory
            regions = [(b.offset - self.base,
                        flat[b.offset - self.base:b.offset - self.base + b.padded])
                       for _, b in self.chunks[chunk]]
            self._inflight[chunk] = shm_comm.start_gather(self.mirror, chunk, regions).logged(
                self.log, "gather", chunk, "shm", numel, flat.dtype)
            return
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        ranks = dist.get_process_group_ranks(self.group)
        ops = []
        for r, b in self.chunks[chunk]:  # both sides list the buckets in one order
            rows = flat[b.offset - self.base:b.offset - self.base + b.padded].view(world, -1)
            ops += [dist.P2POp(dist.isend, rows[rank], ranks[p], self.group)
                    for p in range(world) if p != rank]
            ops += [dist.P2POp(dist.irecv, rows[p], ranks[p], self.group)
                    for p in range(world) if p != rank]
        self._inflight[chunk] = Pending(dist.batch_isend_irecv(ops)).logged(
            self.log, "gather", chunk, "p2p", numel, flat.dtype)

    def finish(self, chunk: int) -> None:
        self._inflight.pop(chunk).wait()
