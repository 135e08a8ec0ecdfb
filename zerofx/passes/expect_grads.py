"""expect_grads: a training forward announces the parameters its backward will deliver.

    before:  primals_1, primals_2, x = inputs;  mm = aten.mm(x, primals_1) ...
    after:   zerofx.expect_grads(sid, [0, 1])          # plan.params 0, 1
             primals_1, ...

A bucket may hold parameters of several graphs; the runtime counts, per micro-step, how many
compiled forwards used each parameter, so it knows when a bucket's last gradient is in and
can start its collective during backward instead of after it (see GradIntake).
"""
from __future__ import annotations

import torch
from torch import fx

from zerofx.passes import PassContext
from zerofx.passes.bucketing import slot_indices, trained_inputs


def expect_grads_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Insert zerofx.expect_grads(sid, names) after the placeholders of a training forward."""
    names = list(trained_inputs(ctx))
    if not names:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]) if placeholders else \
            gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        gm.graph.call_function(torch.ops.zerofx.expect_grads.default, (ctx.state_id, slot_indices(ctx, names)))
    return gm
