"""zero3: ZeRO stage 3 in the graphs: parameters gathered right before use, freed after.

    before:  primals_1 (a stand-in: the weight lives as shards) ─▶ t(primals_1) ─▶ addmm ...
    after:   b0 = zerofx.gather_bucket(sid, slots, ks, offsets, length, ahead)
             w = view(slice(b0, 0, off, off + numel), shape)   # the whole weight
             t(w) ─▶ addmm ...

One gather per bucket of the plan (the unit one all-gather moves), placed before the first
node that reads any of its parameters; ``ahead`` starts the next buckets' all-gathers, up to
``stage3_prefetch_bucket_size`` elements and within ``stage3_max_live_parameters`` of
gathered elements alive at once (counted over the graph's live ranges). A gathered bucket is
freed with its last view, after its last reader: the graph's own value lifetimes.

Runs on the joint graph (so the partitioner sees the gathered values) and on inference
graphs. ``regather_for_backward`` then runs on the partitioned pair: a value the backward
would keep from the forward that is only a gathered weight (or a view or cast of one) is
not saved but gathered again in the backward, ZeRO-3's second all-gather, so no weight stays
whole between forward and backward.
"""
from __future__ import annotations

import math
import operator
import zlib

import torch
from torch import fx

from zerofx.config import ConfigError
from zerofx.graph_ops import EXPECT_GRADS, GATHER_BUCKET, PARAM_SLOTS, TP_PARAM
from zerofx.passes.context import PassContext
from zerofx.passes.nodes import is_cast, is_view, role_of
from zerofx.passes.param_identity import traced_slots, trained_primals


_NOT_CHAIN = {torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default}


def zero3_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace every read of a trained parameter by a slice of its gathered bucket."""
    if not ctx.plan.partitioned:
        return gm
    primals = trained_primals(gm, ctx)
    if not primals:
        return gm
    graph, plan = gm.graph, ctx.plan
    slots = _slots_node(gm, ctx, primals)
    traced = traced_slots(ctx)
    groups: dict[int, list] = {}  # bucket -> [(position, placeholder, slot)]
    for position, (_, node) in enumerate(primals):
        s = plan.params[traced[position]]
        _check_stand_in(node, s)
        groups.setdefault(s.bucket, []).append((position, node, s))
    order = {n: i for i, n in enumerate(graph.nodes)}
    # param_slots reads the stand-ins' addresses (which parameters this call has): that
    # read stays; every other one becomes a slice of the gathered bucket.
    skip = {n for n in graph.nodes if PARAM_SLOTS.is_call(n)}
    # A tensor-parallel weight is read through zerofx.tp_param (its local piece, which at
    # stage 3 is what its bucket gathers): those reads become slices of the bucket too.
    tp_reads: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if TP_PARAM.is_call(n):
            tp_reads.setdefault(TP_PARAM.read(n).name, []).append(n)

    def readers(node):
        return [u for u in node.users if u not in skip] + \
            [u for r in tp_reads.get(role_of(node).name, ()) for u in r.users]

    first = {b: min((order[u] for _, n, _ in g for u in readers(n)), default=None)
             for b, g in groups.items()}
    used = sorted((at, b) for b, at in first.items() if at is not None)
    gathers = []
    for at, b in used:
        members = groups[b]
        before = min((u for _, n, _ in members for u in readers(n)), key=order.__getitem__)
        bucket = plan.buckets[b]
        with graph.inserting_before(before):
            g = GATHER_BUCKET.call(graph, sid=ctx.state_id, slots=slots,
                                   ks=[p for p, _, _ in members],
                                   offsets=[s.offset - bucket.offset for _, _, s in members],
                                   length=bucket.padded, ahead=[], check=0)
            for _, node, s in members:
                off = s.offset - bucket.offset
                piece = graph.call_function(torch.ops.aten.slice.Tensor,
                                            (g, 0, off, off + s.numel))
                whole = graph.call_function(torch.ops.aten.view.default, (piece, list(s.shape)))
                node.replace_all_uses_with(whole, delete_user_cb=lambda u: u not in skip)
                for read in tp_reads.get(s.name, ()):
                    read.replace_all_uses_with(whole)
                    graph.erase_node(read)
        gathers.append(g)
    plan_prefetch(graph, gathers, ctx.config.zero_optimization)
    return gm


def _check_stand_in(node: fx.Node, slot) -> None:
    val = node.meta.get("val")
    traced = slot.tp.full_shape if slot.tp is not None else slot.shape
    if slot.persistent or val is None or tuple(val.shape) == tuple(traced):
        return
    raise ConfigError(
        f"ZeRO-3 parameter {slot.name} reached the compiled graph with shape "
        f"{list(val.shape)} instead of {list(traced)}: outside a call its storage is "
        f"partitioned. Call the model through zerofx.initialize's engine, or inside "
        f"`with runtime.shape_carriers():` when compiling with options={{'runtime': rt}}")


def _slots_node(gm: fx.GraphModule, ctx: PassContext, primals) -> fx.Node:
    """The per-call plan indices: param_identity's (joint), or a new param_slots (inference).
    On the joint graph the gathers read expect_grads' copy, the one the backward keeps."""
    graph = gm.graph
    for node in graph.nodes:
        if EXPECT_GRADS.is_call(node):
            return node
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        return PARAM_SLOTS.call(graph, sid=ctx.state_id, params=[n for _, n in primals],
                                traced=traced_slots(ctx), kept=[])


def plan_prefetch(graph: fx.Graph, gathers: list[fx.Node], zero) -> None:
    """Give each gather the parameters to prefetch (``ahead``): the next gathers' buckets,
    while they fit ``stage3_prefetch_bucket_size`` and the elements alive at that point of
    the graph stay within ``stage3_max_live_parameters``. The first one also carries the
    graph's gather sequence (``check``), compared across ranks before it runs."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    spans = [(order[g], _last_use(g, order), GATHER_BUCKET.read(g).length) for g in gathers]
    for i, g in enumerate(gathers):
        here = order[g]
        live = sum(n for a, z, n in spans if a <= here <= z)
        ahead, fetched = [], 0
        for nxt in gathers[i + 1:]:
            size = GATHER_BUCKET.read(nxt).length
            if fetched + size > zero.stage3_prefetch_bucket_size or \
                    live + fetched + size > zero.stage3_max_live_parameters:
                break
            ahead += list(GATHER_BUCKET.read(nxt).ks)
            fetched += size
        GATHER_BUCKET.update(g, ahead=ahead, check=0)
    if gathers:  # the first gather checks the whole sequence across ranks
        first = min(gathers, key=order.__getitem__)
        shape = repr([(list(GATHER_BUCKET.read(g).ks), GATHER_BUCKET.read(g).length)
                      for g in gathers]).encode()
        GATHER_BUCKET.update(first, check=zlib.crc32(shape) + 1)


def _last_use(node: fx.Node, order: dict) -> int:
    """The last node that reads ``node`` through any chain of views of it."""
    last, todo = order[node], list(node.users)
    while todo:
        u = todo.pop()
        last = max(last, order.get(u, last))
        if is_view(u) or u.target is operator.getitem:
            todo.extend(u.users)
    return last


# ---- the partitioned pair ----------------------------------------------------------------
def regather_pass(pair, ctx: PassContext):
    """On the partitioned pair: a gathered weight the backward would keep from the forward
    is gathered again there instead (regather_for_backward)."""
    fw, bw = pair
    if not any(GATHER_BUCKET.is_call(n) for gm in pair for n in gm.graph.nodes):
        return pair  # nothing partitioned is read: no gather to save or to redo
    regather_for_backward(fw, bw, ctx.num_fwd_outputs, ctx.config.zero_optimization)
    # The partitioner can leave a dead recompute in the backward (the vocabulary-parallel
    # embedding's masked lookup): at stage 3 it would cost a whole bucket's all-gather.
    if bw.graph.eliminate_dead_code():
        bw.recompile()
    return fw, bw


def regather_for_backward(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int,
                          zero) -> None:
    """Gather again in the backward what the forward would save of gathered weights.

    before:  forward returns (out, ..., t_1)   t_1 = t(view(slice(gather_bucket(...))))
             backward(t_1, ..., tangents)      mm(tangent, t_1)
    after:   forward returns (out, ...)
             backward(...)  g = gather_bucket(...); t_1 = t(view(slice(g))); mm(tangent, t_1)
    """
    out = fw.graph.output_node()
    outs = list(out.args[0])
    chains = {}  # saved value -> (gather node, the chain from it, in order)
    for v in outs[num_fwd_outputs:]:
        chain = _chain_to_gather(v) if isinstance(v, fx.Node) else None
        if chain is not None:
            chains[v] = chain
    if not chains:
        return
    inputs = {n.name: n for n in bw.graph.nodes if n.op == "placeholder"}
    order = {n: i for i, n in enumerate(bw.graph.nodes)}
    by_gather: dict[fx.Node, list] = {}
    for v, (g, chain) in chains.items():
        ph = inputs.get(v.name)
        if ph is None:
            raise AssertionError(f"zero3: saved value {v.name} has no backward input")
        by_gather.setdefault(g, []).append((ph, chain))
    gathers = []
    for g, saved in sorted(by_gather.items(),
                           key=lambda kv: min(_first_user(ph, order) for ph, _ in kv[1])):
        fw_slots = GATHER_BUCKET.read(g).slots
        slots = inputs.get(fw_slots.name)
        if slots is None:
            raise AssertionError(f"zero3: the backward does not receive {fw_slots.name}")
        first = min((_first_user(ph, order) for ph, _ in saved))
        anchor = [n for n in bw.graph.nodes if order.get(n) == first][0]
        with bw.graph.inserting_before(anchor):
            g2 = bw.graph.node_copy(g, lambda a: slots if a is fw_slots else a)
            env = {g: g2}
            for ph, chain in saved:
                for c in chain:
                    if c not in env:
                        env[c] = bw.graph.node_copy(c, lambda a: env.get(a, a))
                ph.replace_all_uses_with(env[chain[-1]] if chain else g2)
                bw.graph.erase_node(ph)
        gathers.append(g2)
    kept = [o for o in outs[num_fwd_outputs:] if o not in chains]
    out.args = (tuple(outs[:num_fwd_outputs] + kept),)
    plan_prefetch(bw.graph, gathers, zero)
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()


def _first_user(ph: fx.Node, order: dict) -> int:
    return min((order[u] for u in ph.users), default=math.inf)


def _chain_to_gather(v: fx.Node):
    """(gather, [view/cast nodes from it to ``v``]) when ``v`` is only a gathered weight."""
    chain = []
    node = v
    while not GATHER_BUCKET.is_call(node):
        if not (is_view(node) or is_cast(node)) or node.target in _NOT_CHAIN:
            return None
        tensors = [a for a in node.all_input_nodes]
        if len(tensors) != 1:
            return None
        chain.append(node)
        node = tensors[0]
    return node, chain[::-1]
