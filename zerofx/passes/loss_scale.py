"""loss_scale: multiply the incoming gradient of the backward by the current loss scale (fp16).

    before:  tangents_1 ─▶ (backward ops)
    after:   s = zerofx.loss_scale(sid, tangents_1);  t = mul(tangents_1, s) ─▶ (backward ops)

The scale is read from the ZeroRuntime by an op at run time, so changing it never recompiles
and nothing is read on the host. Unscaling happens once, in the optimizer step.
"""
from __future__ import annotations

import torch
from torch import fx

from zerofx.passes import PassContext
from zerofx.passes.nodes import role_of

aten = torch.ops.aten


def loss_scale_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Scale every floating-point tangent by zerofx.loss_scale(state_id)."""
    tangents = [n for n in gm.graph.nodes if n.op == "placeholder"
                and (r := role_of(n)) is not None and r.kind == "tangent"
                and isinstance(n.meta.get("val"), torch.Tensor)
                and n.meta["val"].dtype.is_floating_point]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for t in tangents:
        users = list(t.users)
        if not users:
            continue
        # Just before the tangent's first use: the partitioner assigns nodes that precede
        # the backward region to the forward, and these depend on a tangent.
        with gm.graph.inserting_before(min(users, key=position.__getitem__)):
            scale = gm.graph.call_function(torch.ops.zerofx.loss_scale.default,
                                           (ctx.state_id, t))
            scaled = gm.graph.call_function(aten.mul.Tensor, (t, scale))
        for u in users:
            u.replace_input_with(t, scaled)
    return gm
