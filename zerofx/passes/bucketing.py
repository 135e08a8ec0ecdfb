"""bucketing: hand gradients to constant-size buckets as soon as each bucket is complete.

    before:  ... g_w2 = mm(..) ... g_w1 = mm(..) ...        return (g_w1, g_b1, g_w2, ...)
    after:   ... g_w2 = mm(..) ... g_b2 = ..
                 zerofx.reduce_bucket(sid, 0, [g_w2, g_b2])   # bucket 0 complete: start it
             ... g_w1 = mm(..) ...
                 zerofx.reduce_bucket(sid, 1, [g_w1, g_b1])
             return (None, None, None, ...)                   # autograd gets no param grads

Each bucket's op goes right after the last of its gradients is produced, so its collective
(started by the runtime, async) overlaps the rest of the backward; the wait is in the
optimizer step. Buckets come from the plan (one source of truth for layout).
"""
from __future__ import annotations

from torch import fx
import torch

from zerofx.passes import PassContext


def bucketing_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Insert one zerofx.reduce_bucket per plan bucket; return None for parameter grads."""
    out = gm.graph.output_node()
    grads = list(out.args[0])
    index_of = {r.name: i for i, r in enumerate(ctx.roles) if r.kind == "param"}
    missing = [p.name for p in ctx.plan.params if p.name not in index_of]
    if missing:
        raise RuntimeError(
            f"zerofx ZeRO needs every trained parameter in one compiled graph, but "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''} are not in this one (a graph "
            f"break?). Compile with fullgraph=True to find the break, or leave them out of "
            f"the ZeroRuntime")
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for b in ctx.plan.buckets:
        nodes = [grads[index_of[name]] for name in b.params]
        produced = [n for n in nodes if isinstance(n, fx.Node)]
        anchor = max(produced, key=position.__getitem__) if produced else out.prev
        with gm.graph.inserting_after(anchor):
            gm.graph.call_function(torch.ops.zerofx.reduce_bucket.default,
                                   (ctx.state_id, b.index, nodes))
        for name in b.params:
            grads[index_of[name]] = None
    out.args = (tuple(grads),)
    return gm
