"""CommContext: everything one runtime communicates with, in one object handed to those who
move bytes (gradient intake, stage 3's gathers, the optimizer step).

    group         the data-parallel group (None: one data-parallel rank)
    tp_group      the tensor-parallel group (None: no tensor parallelism)
    param_group   stage 3's parameter-gather group, its own so the graphs' gathers never
                  pair with bucket collectives in flight on ``group`` (None below stage 3)
    forms         {role: Choice}: how buckets reduce and shards gather, each form timed
                  once on its group, the fastest kept (comm/forms.py)
    cost          the dump's alpha-beta model, fitted to those timings
    shm           {role: ShmMirror} for the roles whose form is ``shm``
    step_gathers  the optimizer step's chunked all-gathers (StepGathers)
    log           collective times measured while training (only with a dump on)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zerofx.comm_cost import CommCost
from zerofx.plan import Plan, gather_chunks
from zerofx.runtime.comm.forms import (Choice, StepGathers, choose_forms, choose_param_gather,
                                       cost_of, kind_of, shm_mirrors)
from zerofx.runtime.comm.log import CommLog

log = logging.getLogger(__name__)


@dataclass
class CommContext:
    """One runtime's groups, collective forms, shared memory and log (see the module doc)."""

    group: object
    tp_group: object
    param_group: object
    forms: dict[str, Choice]
    cost: CommCost
    shm: dict
    step_gathers: StepGathers
    log: CommLog | None = None

    @classmethod
    def build(cls, plan: Plan, config, device: torch.device, *, group, tp_group,
              param_group) -> "CommContext":
        """Time and choose the forms, map the shared memory they need: a collective (every
        rank of the groups calls it, in one order)."""
        forms = choose_forms(plan, config, group, reduces_into_shard=plan.reduces_into_shard,
                             device=device)
        if param_group is not None:  # stage 3's bucket gathers, on their own group
            forms.update(choose_param_gather(plan, config, param_group, device))
        if plan.rank == 0:
            _warn_unused_pins(config, forms)
        shm = shm_mirrors(plan, config, forms, group, param_group)
        return cls(group=group, tp_group=tp_group, param_group=param_group, forms=forms,
                   cost=cost_of(forms, plan), shm=shm,
                   step_gathers=StepGathers(group, gather_chunks(plan, config),
                                            plan.persist_offset, mirror=shm.get("gather")))

    def norm_group(self, plan: Plan):
        """Where the squared gradient norm is summed: over the DP shards, and over the TP
        group when weights are split (replicated weights then count 1/tp on each rank)."""
        if plan.grid.tp_size > 1:
            return dist.group.WORLD if plan.sharded else self.tp_group
        return self.group if plan.sharded else None

    @property
    def tp_group_name(self) -> str | None:
        return self.tp_group.group_name if self.tp_group is not None else None

    def kinds(self) -> tuple[tuple[str, str], ...]:
        """(role, the cost model's kind of its chosen form), for the passes' dumps."""
        return tuple((r, kind_of(r, c.form)) for r, c in self.forms.items())

    def log_to(self, dump_root: str, rank: int) -> None:
        """Time every collective started from now on, into the dump at ``dump_root``."""
        if self.log is None:
            self.log = self.step_gathers.log = CommLog.under(dump_root, rank, self.cost)

    def describe(self) -> str:
        """The dump's lines on how buckets and shards move."""
        if not self.forms:
            return ""
        return "\ncollective forms (data-parallel group):\n" + "".join(
            f"  {'stage-3 bucket ' if k == 'param_gather' else ''}{c.describe()}\n"
            for k, c in self.forms.items())


def _warn_unused_pins(config, forms) -> None:
    """A pinned form no collective here takes is said once, not silently dropped."""
    for role, why in (("reduce", "only ZeRO-2 and 3 reduce buckets into shards (stages 0-1 "
                                 "all-reduce the whole gradient buffer)"),
                      ("gather", "only ZeRO 1-3 gather shards")):
        pin = getattr(config.zerofx, f"{role}_form")
        if pin != "fastest" and not any(c.role == role for c in forms.values()):
            log.warning("zerofx.%s_form %r has no effect here: %s, over more than one "
                        "data-parallel rank", role, pin, why)
