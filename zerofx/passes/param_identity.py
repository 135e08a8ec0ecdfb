"""param_identity: each call of a training graph says which parameters it read.

    before:  primals_1, primals_2, x ... ─▶ (forward) ─▶ (backward) ─▶ return (.., g_1, g_2)
    after:   slots = zerofx.param_slots(sid, [primals_1, primals_2], traced)  # per call
             slots = zerofx.expect_grads(sid, slots)  # runtime: these gradients will come
             ... (backward) ...
             return (.., zerofx.tag_grad(g_1, slots, 0), zerofx.tag_grad(g_2, slots, 1))

One compiled graph may run for several modules: Dynamo resumes a loop of blocks it could
not trace whole by compiling ``Block.forward`` once and calling it for every block, each
time with other parameters. So the graph cannot know its parameters at compile time; the
call does. Placed in the joint graph, ``slots`` is computed in the forward and saved for
the backward of the same call (the partitioner keeps it because ``tag_grad`` reads it);
the bucketing pass turns the tags into reduce_bucket ops and removes them.
"""
from __future__ import annotations

from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from zerofx.graph_ops import EXPECT_GRADS, PARAM_SLOTS, TAG_GRAD
from zerofx.passes.context import PassContext
from zerofx.passes.nodes import role_of


def traced_slots(ctx: PassContext) -> list[int]:
    """Plan indices of the trained parameters the graph was traced with, in input order
    (judged by those parameters: Dynamo guards requires_grad). Tag positions index this."""
    index = {s.name: i for i, s in enumerate(ctx.plan.params)}
    return [index[r.name] for r in ctx.roles if r.kind == "param" and r.name in index]


def trained_primals(gm: fx.GraphModule, ctx: PassContext) -> list[tuple[int, fx.Node]]:
    """(input position, placeholder) of the parameters of this graph that the plan trains."""
    planned = {s.name for s in ctx.plan.params}
    out = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        role = role_of(node)
        if role is not None and role.kind == "param" and role.name in planned:
            out.append((i, node))
    return out


def param_identity_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Insert param_slots + expect_grads after the inputs and tag each parameter gradient."""
    primals = trained_primals(gm, ctx)
    if not primals or ctx.num_fwd_outputs is None:
        return gm
    graph = gm.graph
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        traced = traced_slots(ctx)
        # Tensor-parallel weights are read by name (tp_param), their traced stand-ins never:
        # they keep their traced index, and the others show whether the graph is reused.
        split = {s.name for s in ctx.plan.params if s.tp is not None}
        found = [n for _, n in primals if role_of(n).name not in split]
        kept = [t for (_, n), t in zip(primals, traced) if role_of(n).name in split]
        slots = PARAM_SLOTS.call(graph, sid=ctx.state_id, params=found, traced=traced,
                                 kept=kept)
    with graph.inserting_after(slots):
        expected = EXPECT_GRADS.call(graph, sid=ctx.state_id, slots=slots)
    for node in (slots, expected):  # computed once, in the forward: a recompute in the
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE  # backward would count twice
    out = graph.output_node()
    outputs = list(out.args[0])
    grads_at = ctx.num_fwd_outputs  # joint outputs: forward outputs, then input gradients
    for position, (i, _) in enumerate(primals):
        g = outputs[grads_at + i]
        if isinstance(g, fx.Node):
            with graph.inserting_before(out):
                outputs[grads_at + i] = TAG_GRAD.call(graph, grad=g, slots=expected,
                                                      position=position)
    out.args = (tuple(outputs),)
    return gm
