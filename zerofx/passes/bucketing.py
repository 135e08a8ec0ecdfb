"""bucketing: hand this call's parameter gradients to the buckets as soon as they exist.

    before:  ... g_w2 = mm(..) ...  t2 = zerofx.tag_grad(g_w2, slots, 1) ...
             return (zerofx.tag_grad(g_w1, slots, 0), t2, ...)
    after:   ... g_w2 = mm(..) ... g_b2 = ..
                 zerofx.reduce_bucket(sid, slots, [1, 2], [g_w2, g_b2])   # a bucket's worth
             ... g_w1 = mm(..) ...
                 zerofx.reduce_bucket(sid, slots, [0], [g_w1])
             return (None, None, ...)                       # autograd gets no param grads

``slots`` (from param_identity) says which plan parameters this call read; each op goes
right after the last gradient of one group, grouped by the buckets of the parameters the
graph was traced with, so the runtime (GradIntake) can start a bucket's collective while
the rest of the backward runs. The wait is in the optimizer step.
"""
from __future__ import annotations


from torch import fx

from zerofx.graph_ops import REDUCE_BUCKET, TAG_GRAD
from zerofx.passes.context import PassContext
from zerofx.passes.nodes import is_cast, is_view
from zerofx.passes.param_identity import traced_slots


def bucketing_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace tag_grad outputs by one zerofx.reduce_bucket per bucket group."""
    out = gm.graph.output_node()
    outputs = list(out.args[0])
    tagged = [(k, n) for k, n in enumerate(outputs) if TAG_GRAD.is_call(n)]
    if not tagged:
        return gm
    for _, tag in tagged:
        _hoist(gm.graph, TAG_GRAD.read(tag).grad)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    slot_of_param = dict(enumerate(traced_slots(ctx)))  # grouping only: calls route by slots
    groups: dict[int, list] = {}
    for k, tag in tagged:
        grad, slots, pos = TAG_GRAD.read(tag)
        bucket = ctx.plan.params[slot_of_param[pos]].bucket if pos in slot_of_param else -1
        groups.setdefault(bucket, []).append((pos, grad, slots))
        outputs[k] = None
    out.args = (tuple(outputs),)
    for bucket in sorted(groups):
        members = groups[bucket]
        anchor = max([g for _, g, _ in members] + [members[0][2]], key=position.__getitem__)
        with gm.graph.inserting_after(anchor):
            REDUCE_BUCKET.call(gm.graph, sid=ctx.state_id, slots=members[0][2],
                               positions=[p for p, _, _ in members],
                               grads=[g for _, g, _ in members])
    for _, tag in tagged:
        gm.graph.erase_node(tag)
    return gm


def _hoist(graph: fx.Graph, node: fx.Node) -> None:
    """Move a gradient's trailing views and casts up to right after what they read.

    Earlier passes may leave them just before the output (mixed_precision restores the
    output dtypes there; a bias gradient's reshape then trails the whole backward), and a
    bucket's op goes after its last gradient: without this, every bucket would wait for the
    end of the backward and no collective would overlap it.
    """
    if node.op != "call_function" or not (is_view(node) or is_cast(node)):
        return
    for arg in node.all_input_nodes:
        _hoist(graph, arg)
    position = {n: i for i, n in enumerate(graph.nodes)}
    latest = max(node.all_input_nodes, key=position.__getitem__, default=None)
    if latest is not None and latest.op == "placeholder":  # inputs stay first
        latest = max((n for n in graph.nodes if n.op == "placeholder"), key=position.__getitem__)
    if latest is not None and position[latest] + 1 < position[node]:
        latest.append(node)  # moves node to right after latest; its users are all later
