"""bucketing: hand this graph's gradients to the plan's buckets as soon as each is produced.

    before:  ... g_w2 = mm(..) ... g_w1 = mm(..) ...        return (g_w1, g_b1, g_w2, ...)
    after:   ... g_w2 = mm(..) ... g_b2 = ..
                 zerofx.reduce_bucket(sid, 0, [2, 3], [g_w2, g_b2])   # plan.params 2, 3
             ... g_w1 = mm(..) ...
                 zerofx.reduce_bucket(sid, 1, [0, 1], [g_w1, g_b1])
             return (None, None, None, ...)                   # autograd gets no param grads

A step is many graphs (graph breaks, eager code): each backward hands over only the
parameters it owns, right after the last of its gradients in that bucket is produced. The
runtime (GradIntake) starts a bucket's collective once its gradients from every graph of
the step are in, so it overlaps the rest of the backward; the wait is in the optimizer step.
Buckets come from the plan (one source of truth for layout); parameters are matched by
identity, so an alias (BERT's decoder bias) or a tied weight is one parameter.
"""
from __future__ import annotations

from torch import fx
import torch

from zerofx.passes import PassContext


def trained_inputs(ctx: PassContext) -> dict[str, int]:
    """{plan name: forward input index} of the trained parameters this graph reads."""
    planned = {s.name for s in ctx.plan.params}
    return {r.name: i for i, r in enumerate(ctx.roles)
            if r.kind == "param" and r.name in planned}


def slot_indices(ctx: PassContext, names) -> list[int]:
    """Positions in plan.params (op schemas take ints, not strings)."""
    index = {s.name: i for i, s in enumerate(ctx.plan.params)}
    return [index[n] for n in names]


def bucketing_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Insert one zerofx.reduce_bucket per bucket this graph touches; params' grads -> None."""
    out = gm.graph.output_node()
    grads = list(out.args[0])
    index_of = trained_inputs(ctx)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for b in ctx.plan.buckets:
        names = [name for name in b.params if name in index_of]
        if not names:
            continue
        nodes = [grads[index_of[name]] for name in names]
        produced = [n for n in nodes if isinstance(n, fx.Node)]
        anchor = max(produced, key=position.__getitem__) if produced else out.prev
        with gm.graph.inserting_after(anchor):
            gm.graph.call_function(torch.ops.zerofx.reduce_bucket.default,
                                   (ctx.state_id, b.index, slot_indices(ctx, names), nodes))
        for name in names:
            grads[index_of[name]] = None
    out.args = (tuple(grads),)
    return gm
