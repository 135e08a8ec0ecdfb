"""tensor_parallel: Megatron's tensor parallelism on the joint graph, by sharding propagation.

    before (traced with full-shape weights):
        t = t(W1); a = addmm(b1, x, t); g = gelu(a); o = addmm(b2, g, t(W2))   # [B, 4C] ...
        ... backward: dx = mm(da, t(t)) ...
    after (W1, b1 split by rows, W2 by columns; shapes are this rank's):
        W1 = zerofx.tp_param(sid, "fc1.weight")                             # [4C/tp, C]
        a = addmm(b1', x, t(W1)); g = gelu(a)                               # [B, 4C/tp]
        o = add(wait(all_reduce(mm(g, t(W2')))), b2)                        # row-parallel out
        ... backward: dx = wait(all_reduce(mm(da, W1)))                     # column-parallel in

The runtime keeps each split parameter's local piece; the graph reads it with
``zerofx.tp_param`` instead of the full-shape stand-in Dynamo traced. Walking the graph in
order, every value gets a sharding (tp_rules): shape constants of views, expands and splits
are divided where the split lands (heads per rank), and wherever a split dimension is summed
away (a row-parallel matmul in forward, a column-parallel input gradient in backward) the
partial sums are all-reduced over the tensor-parallel group right there. An op with no rule
for split inputs is an error naming it: nothing silently computes on the wrong shapes.
"""
from __future__ import annotations

import torch
from torch import fx

import zerofx.tp.propagation as P
import zerofx.tp.rules as R
from zerofx.graph_ops import TP_PARAM
from zerofx.passes.context import PassContext
from zerofx.passes.fake_vals import compute_val, fake_mode_of
from zerofx.passes.tensor_parallel import sequence as S
from zerofx.passes.tensor_parallel import vocab as tp_vocab
from zerofx.fx_source import model_line
from zerofx.passes.nodes import META_TP_SHARDING, role_of
from zerofx.tp.layout import TPPlanError
from zerofx.tp.propagation_cuts import TRACED_ARGS, _one_index, index_as_slice

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional


def tensor_parallel_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Read split parameters' local pieces, fix shapes, all-reduce partial sums."""
    tp = ctx.plan.grid.tp_size
    split = {s.name: s for s in ctx.plan.params if s.tp is not None}
    if tp == 1 or not split:
        return gm
    if ctx.tp_group is None or ctx.state_id is None:
        raise TPPlanError("tensor_parallel.size > 1 needs the training state that holds the "
                          "split weights: use zerofx.initialize (or a ZeroRuntime)")
    full = {n: P.shapes(n.meta.get("val")) for n in gm.graph.nodes}
    state, origin = _read_local_params(gm, ctx, split, full)
    seq = ctx.config.tensor_parallel.sequence_parallel
    tokens: set = set()  # values split over tokens (sequence parallelism, sequence.py)
    # the live graph, not a snapshot: a node a rewrite adds after the current one (the bias
    # add of a row-parallel addmm) is visited too; added collectives carry their state
    for node in _live(gm.graph):
        if node.op != "call_function" or node in state:
            continue
        ins = [a for a in node.all_input_nodes if state.get(a) is not None]
        if not ins:
            if node in state.presets:
                state[node] = state.presets[node]
            continue
        origin[node] = frozenset().union(*(origin.get(a, ()) for a in ins))
        state[node] = _sharding(node, state, full, tokens, ctx, origin[node])
        # split over tokens if a token-split input is still read (not gathered whole)
        if isinstance(state[node], (R.Shard, list)) and \
                any(a in tokens for a in node.all_input_nodes):
            tokens.add(node)
        if isinstance(state[node], R.GroupPartial):
            _sum_over_group(node, state, full, tp, ctx.plan.grid.tp_rank(ctx.plan.rank),
                            ctx.tp_group)
        elif state[node] == R.PARTIAL:
            if seq and S.scatters(node, full, tp):
                S.reduce_scatter_after(node, state, full, tokens, tp=tp, group=ctx.tp_group)
            else:
                _all_reduce_after(gm, node, ctx.tp_group, state, full)
    _check_outputs(gm, ctx, state, split, tp, full)
    mode = fake_mode_of(gm.graph)
    for node in gm.graph.nodes:  # shapes changed all along the way: recompute every value
        compute_val(node, mode)
        # for later passes (partition_activations): None means the same on every TP rank
        node.meta[META_TP_SHARDING] = state.get(node)
    return gm


def _live(graph: fx.Graph):
    node = graph._root.next
    while node is not graph._root:
        yield node
        node = node.next


def _sharding(node, state, full, tokens, ctx, params):
    """``node``'s output sharding, the node rewritten to match; with sequence parallelism an
    op no rule fits runs on its token-split operands gathered whole (a column-parallel
    layer's input, a weight's gradient)."""
    tp, tp_rank, group = ctx.plan.grid.tp_size, ctx.plan.grid.tp_rank(ctx.plan.rank), ctx.tp_group
    try:
        return _propagate(node, state, full, tp, tp_rank, group)
    except R.Unshardable as e:
        if not (ctx.config.tensor_parallel.sequence_parallel and
                S.gather_tokens(node, state, full, tokens, tp=tp, group=group)):
            raise TPPlanError(_explain(node, params, str(e), ctx)) from None
    if not any(state.get(a) is not None for a in node.all_input_nodes):
        return state.presets.get(node)  # whole now (or preset: a vocabulary rows' gradient)
    try:
        return _propagate(node, state, full, tp, tp_rank, group)
    except R.Unshardable as e:
        raise TPPlanError(_explain(node, params, str(e), ctx)) from None


class _State(dict):
    """node -> sharding, plus ``presets``: nodes whose output sharding a rewrite fixed in
    advance (the gradient of a vocabulary-split table holds this rank's rows, though its
    inputs are whole), taken when the node is reached with nothing split to read."""

    def __init__(self):
        super().__init__()
        self.presets: dict = {}


def _read_local_params(gm, ctx, split, full):
    """Replace each split parameter's placeholder by zerofx.tp_param (its local piece)."""
    state, origin = _State(), {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        role = role_of(ph)
        if role is None or role.kind != "param" or role.name not in split:
            continue
        shard = split[role.name].tp
        traced = P.shapes(ph.meta.get("val"))
        if traced is not None and traced != shard.full_shape:
            raise TPPlanError(
                f"{role.name} was traced with shape {list(traced)}, not its full shape "
                f"{list(shard.full_shape)}: call the compiled model inside "
                f"`with runtime.shape_carriers():` (zerofx.initialize's engine does this)")
        with gm.graph.inserting_after(placeholders[-1]):
            local = TP_PARAM.call(gm.graph, sid=ctx.state_id, name=role.name)
        ph.replace_all_uses_with(local)
        state[local] = shard.sharding()
        full[local], origin[local] = shard.full_shape, frozenset({role.name})
    return state, origin


def _propagate(node: fx.Node, state, full, tp: int, tp_rank: int, group: str):
    """The output sharding of ``node`` (tp_propagation decides); rewrites the node to run on
    this rank's pieces: replicated operands sliced, shape arguments divided where the split
    lands, a row-parallel addmm turned into mm + add (the all-reduce goes between), the
    vocabulary-parallel embedding and cross-entropy (vocab.py)."""
    t, args = node.target, node.args
    if P.may_localize(t):
        _localize(node, state, full, tp, tp_rank, along=P.cat_dim(node, full))
    out = P.infer(node, state, full, tp)
    if t in P.VIEWS:
        node.args = (args[0], _divide_at(args[1], out, tp))
    elif t is aten.expand.default:
        node.args = (args[0], _divide_at(args[1], out, tp), *args[2:])
    elif t in (aten.split.Tensor, aten.split_with_sizes.default):
        _split(node, state, full, tp)
    elif t is aten.slice.Tensor and isinstance(state.get(args[0]), (R.Shard, R.Regions)):
        _local_bounds(node, 1, state.get(args[0]), full[args[0]], tp)
    elif t is aten.slice_backward.default and isinstance(out, (R.Shard, R.Regions)):
        node.args = (args[0], _divide_at(args[1], out, tp), *args[2:])
        _local_bounds(node, 2, out, args[1], tp)
    elif t in (aten.index.Tensor, aten._unsafe_index.Tensor) and \
            isinstance(state.get(args[0]), R.Regions):
        _index_as_local_slice(node, state.get(args[0]), full, tp)
    elif t is aten.select_backward.default and isinstance(out, R.Shard):
        node.args = (args[0], _divide_at(args[1], out, tp), *args[2:])
    elif t in (aten.mm.default, aten.addmm.default) and out == R.PARTIAL and \
            isinstance(state.get(args[-2]), R.Regions):
        _count_whole_rows_once(node, state, full, tp, tp_rank)
    if t is aten.addmm.default and out == R.PARTIAL:
        _row_parallel_addmm(node, full)
    elif t in P.VOCAB_PARALLEL:
        tp_vocab.rewrite(node, out, state, full, tp=tp, tp_rank=tp_rank, group=group)
    return out


def _localize(node, state, full, tp: int, tp_rank: int, *, along: int | None = None):
    """Slice the replicated operands that meet a split one elementwise (P.localized) to this
    rank's part. Hugging Face's key/value cache starts empty and replicated, then takes each
    step's split heads; the incoming gradient of an output is whole; a layer left out of the
    plan next to split ones computes whole values."""
    swap = {}
    for a, sh in P.localized(node, state, full, along=along).items():
        swap[a] = _local_slice(node, a, sh, full[a], tp, tp_rank)
        state[swap[a]], full[swap[a]] = sh, full[a]
    if swap:
        node.args = fx.node.map_arg(node.args, lambda a: swap.get(a, a))
        node.kwargs = fx.node.map_arg(node.kwargs, lambda a: swap.get(a, a))


def _local_slice(before: fx.Node, value: fx.Node, sh: R.Shard, shape, tp: int, rank: int):
    """This rank's part of a replicated ``value`` under split ``sh``: dimension d read as
    (outer, f, s), factor indices [rank·f/tp, (rank+1)·f/tp) of every outer block."""
    d, n = sh.dim, shape[sh.dim]
    graph = before.graph
    if isinstance(sh, R.Regions):
        with graph.inserting_before(before):
            return _take(graph, value, d, _rank_spans(sh, tp, rank, whole=True))
    sh = R.normalize(sh, n)
    with graph.inserting_before(before):
        if sh.s == 1 and sh.f == n:  # a plain split: one slice
            return graph.call_function(aten.slice.Tensor,
                                       (value, d, rank * n // tp, (rank + 1) * n // tp))
        blocks = [*shape[:d], n // (sh.f * sh.s), sh.f, sh.s, *shape[d + 1:]]
        v = graph.call_function(aten.reshape.default, (value, blocks))
        part = graph.call_function(aten.slice.Tensor, (v, d + 1, rank * sh.f // tp,
                                                       (rank + 1) * sh.f // tp))
        local = [*shape[:d], n // tp, *shape[d + 1:]]
        return graph.call_function(aten.reshape.default, (part, local))


def _divide_at(sizes, sh, tp: int) -> list:
    """A shape argument with the split dimension (of ``sh``) at this rank's size; the other
    entries (symbolic sizes of a dynamic batch or sequence among them) stay as traced. -1
    infers the local size."""
    sizes, dim = list(sizes), sh.dim
    if isinstance(sizes[dim], fx.Node):
        raise R.Unshardable("the split dimension has a dynamic size")
    if sizes[dim] != -1:
        sizes[dim] = R.local_size(sh, sizes[dim], tp)
    return sizes


def _local_bounds(node, at: int, sh, shape, tp: int) -> None:
    """A slice (``slice(x, dim, start, end, step)``, or slice_backward's dim, start, end at
    ``at``) of whole blocks of the split dimension: this rank's piece holds its share of
    every block, so it slices [start/tp, end/tp)."""
    args = list(node.args) + [None] * (at + 4 - len(node.args))
    dim, start, end, step = args[at:at + 4]
    dim %= len(shape)
    if not isinstance(sh, (R.Shard, R.Regions)) or dim != sh.dim:
        return
    lo, hi = R.slice_bounds(start, end, step, shape[dim])
    node.meta.setdefault(TRACED_ARGS, node.args)
    args[at:at + 4] = [dim, *(sh.local_bounds(lo, hi, tp) if isinstance(sh, R.Regions)
                              else (lo // tp, hi // tp)), 1]
    node.args = tuple(args)


def _index_as_local_slice(node, sh: R.Regions, full, tp: int) -> None:
    """An index of constant consecutive positions inside regions every rank holds whole
    (Falcon multi-query's ``qkv[..., [-2], :]``, P.index_as_slice): the same rows sit at
    other positions of this rank's piece, so it becomes the slice of them there (the same
    values; its backward, an index_put into zeros of the full shape, stays whole and is
    sliced to this rank's part where it meets split values)."""
    if _one_index(node.args[1], full)[0] != sh.dim:  # along another dimension: the rule
        return  # moved the split past it; nothing to rewrite (and its values may be computed)
    d, start, end = index_as_slice(node, sh, full)
    lo, hi = sh.local_bounds(start, end, tp)
    node.meta.setdefault(TRACED_ARGS, (node.args[0], d, start, end, 1))
    node.target = aten.slice.Tensor
    node.args = (node.args[0], d, lo, hi, 1)


def _split(node, state, full, tp):
    """A split along the split dimension takes local piece sizes."""
    x, size_arg = node.args[0], node.args[1]
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(full[x])
    sh = state.get(x)
    if dim == sh.dim:
        local, _ = R.split_pieces(sh, dim, [p[dim] for p in full[node]], full[x][dim], tp)
        if isinstance(sh, R.Regions):  # unequal local pieces, whatever the traced split
            node.target = aten.split_with_sizes.default
        new = local if node.target is aten.split_with_sizes.default else size_arg // tp
        node.args = (x, new, dim)


def _rank_spans(sh: R.Regions, tp: int, rank: int, *, whole: bool, local: bool = False):
    """[(start, length)] along sh.dim of this rank's part of each region, in the full value
    (or, ``local``, in this rank's piece). With ``whole`` every region; without, only the
    parts no other rank also counts: split regions, whole ones on rank 0 only, a group's
    on the first rank of its group only (summed over the ranks, each counts once)."""
    spans, at, mine = [], 0, 0
    for n, w in zip(sh.sizes, sh.whole):
        g = R.ways(w, tp)
        m, piece = n // g, rank * g // tp
        if whole or rank % (tp // g) == 0:
            spans.append((mine if local else at + piece * m, m))
        at, mine = at + n, mine + m
    return spans


def _take(graph, value: fx.Node, dim: int, spans) -> fx.Node:
    """cat of ``value``'s [start, start + length) spans along ``dim`` (none: an empty
    slice, so a matmul contracting it adds zeros)."""
    spans = spans or [(0, 0)]
    parts = [graph.call_function(aten.slice.Tensor, (value, dim, a, a + m)) for a, m in spans]
    return parts[0] if len(parts) == 1 else graph.call_function(aten.cat.default, (parts, dim))


def _count_whole_rows_once(node, state, full, tp: int, tp_rank: int) -> None:
    """mm(a, b) contracting regions of which some are whole on every rank (the input
    gradient of a multi-query fused q|k|v) or on every rank of a group (grouped key/value
    heads): summed over the ranks, those rows would count tp (tp/g) times, so only the
    first rank (of the group) keeps them; the others contract the rest alone.
        before: mm(a, b)                    a [M, local], b [local, N]
        after:  mm(cat(a[:, rows]), cat(b[rows, :]))   rows: _rank_spans(whole=False)"""
    a, b = node.args[-2:]
    sa, sb = state[a], state[b]
    if _rank_spans(sa, tp, tp_rank, whole=False) == _rank_spans(sa, tp, tp_rank, whole=True):
        return
    graph = node.graph
    with graph.inserting_before(node):
        a2 = _take(graph, a, sa.dim, _rank_spans(sa, tp, tp_rank, whole=False, local=True))
        b2 = _take(graph, b, sb.dim, _rank_spans(sb, tp, tp_rank, whole=False, local=True))
    node.args = (*node.args[:-2], a2, b2)


def _sum_over_group(node, state, full, tp: int, tp_rank: int, group: str) -> None:
    """Sum a grouped key/value gradient (R.GroupPartial: this rank's query heads' share of
    its group's) over the group's ranks: placed at its group's heads in a zero tensor of
    the full head count, all-reduced over the tensor-parallel group (the other groups' ranks
    add zeros there), this rank's group taken back. One all-reduce of the key/value
    activation gradient, kv_heads·head_dim wide (a fraction kv_heads/heads of the hidden
    width of the all-reduces TP already does), on the group every rank already has; after
    it the gradient is the group's on each of its ranks, so the weights' gradients need no
    further sum (and the input gradient counts the group once: _count_whole_rows_once).
        before: g = getitem(sdpa_backward(..), 1)                   [B, 1, T, hd]
        after:  wait(all_reduce(constant_pad_nd(g, heads before/after)))[:, group]"""
    sh = state[node].of
    d, n = sh.dim, full[node][sh.dim]
    (start, m), = _rank_spans(sh, tp, tp_rank, whole=True)
    pad = [0, 0] * (len(full[node]) - 1 - d) + [start, n - start - m]
    graph = node.graph
    with graph.inserting_after(node):
        padded = graph.call_function(aten.constant_pad_nd.default, (node, pad, 0.0))
    state[padded], full[padded] = None, full[node]
    with graph.inserting_after(padded):
        reduced = graph.call_function(_c10d.all_reduce.default, (padded, "sum", group))
    with graph.inserting_after(reduced):
        done = graph.call_function(_c10d.wait_tensor.default, (reduced,))
    with graph.inserting_after(done):
        mine = graph.call_function(aten.slice.Tensor, (done, d, start, start + m))
    node.replace_all_uses_with(mine, delete_user_cb=lambda u: u is not padded)
    state[reduced], state[done], state[mine] = R.PARTIAL, None, sh
    full[reduced] = full[done] = full[mine] = full[node]
    state[node] = sh  # (its value: each rank's share, read only by the sum)


def _row_parallel_addmm(node, full) -> None:
    """addmm(bias, a, b) whose matmul is a partial sum: the bias is added once, after the
    all-reduce (Megatron's row-parallel layer), so the node becomes mm and an add follows."""
    bias, a, b = node.args[:3]
    node.target, node.args = aten.mm.default, (a, b)
    graph = node.graph
    with graph.inserting_after(node):
        add = graph.call_function(aten.add.Tensor, (node, bias))
    node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    full[add] = full[node]


def _all_reduce_after(gm, node, group: str, state, full) -> None:
    """Sum the partial results of ``node`` over the tensor-parallel group, right after it."""
    with gm.graph.inserting_after(node):
        reduced = gm.graph.call_function(_c10d.all_reduce.default, (node, "sum", group))
    with gm.graph.inserting_after(reduced):
        done = gm.graph.call_function(_c10d.wait_tensor.default, (reduced,))
    node.replace_all_uses_with(done, delete_user_cb=lambda u: u is not reduced)
    state[reduced], state[done] = R.PARTIAL, None
    full[reduced] = full[done] = full[node]


def _check_outputs(gm, ctx, state, split, tp, full) -> None:
    """Make split outputs and replicated weights' gradients whole; split weights' gradients
    must match their piece."""
    outs = list(gm.graph.output_node().args[0])
    n_fwd = ctx.num_fwd_outputs if ctx.graph_kind == "joint" else len(outs)
    for i, out in enumerate(outs[:n_fwd]):
        if isinstance(out, fx.Node) and state.get(out) is not None:
            outs[i] = _gather_output(gm, ctx, out, state.get(out), full[out], tp, i)
    primals = [role_of(n) for n in gm.graph.nodes if n.op == "placeholder"]
    primals = [r for r in primals if r is None or r.kind != "tangent"]
    for j, (role, grad) in enumerate(zip(primals, outs[n_fwd:])):
        split_weight = role is not None and role.kind == "param" and role.name in split
        if not split_weight and isinstance(state.get(grad), (R.Shard, R.Regions)):
            # a replicated weight used on a sliced value (a layer left out of the plan next
            # to split ones), or an activation a graph break handed in whose gradient is
            # still split over tokens (sequence parallelism): gathered whole
            outs[n_fwd + j] = _gather_output(gm, ctx, grad, state[grad], full[grad], tp,
                                             n_fwd + j)
        elif split_weight and isinstance(grad, fx.Node):
            want = split[role.name].tp.sharding()
            if state.get(grad) is None:
                outs[n_fwd + j] = _own_piece(ctx, grad, want, state, full, tp)
            elif state.get(grad) != want:
                raise TPPlanError(f"the gradient of {role.name} comes out split as "
                                  f"{state.get(grad)}, not as the weight ({want})")
    gm.graph.output_node().args = (tuple(outs),)


def _own_piece(ctx, grad: fx.Node, want, state, full, tp: int) -> fx.Node:
    """A split weight's gradient computed whole, the same on every rank (None: nothing
    split reached it), cut to this rank's piece. A tied vocabulary table in a graph that
    holds only its LM-head use (a graph break between the embedding and the head, as
    Hugging Face's gradient checkpointing makes in GPT-2) multiplies the whole incoming
    gradient of the logits by the whole hidden states: every rank's piece is there."""
    tp_rank = ctx.plan.grid.tp_rank(ctx.plan.rank)
    piece = _local_slice(grad.graph.output_node(), grad, want, full[grad], tp, tp_rank)
    state[piece], full[piece] = want, full[grad]
    return piece


def _gather_output(gm, ctx, out: fx.Node, sh, shape, tp: int, i: int) -> fx.Node:
    """All-gather a split graph output whole: a model output (the key/value cache a Hugging
    Face model returns in training; outputs are what the user sees) or the gradient of a
    replicated weight (its bucket holds the whole weight's gradient)."""
    if isinstance(sh, R.Regions) and len(sh.sizes) == 1 and sh.whole[0] is not True:
        # key/value heads in g rank groups (a Hugging Face cache): every rank's piece
        # gathered, the first rank of each group's taken
        g, m = sh.whole[0], sh.sizes[0] // sh.whole[0]
        with gm.graph.inserting_before(gm.graph.output_node()):
            every = S.gather(gm.graph, out, sh.dim, tp=tp, group=ctx.tp_group)
            return _take(gm.graph, every, sh.dim, [(k * (tp // g) * m, m) for k in range(g)])
    if not isinstance(sh, R.Shard) or \
            R.normalize(sh, shape[sh.dim]) != R.Shard(sh.dim, shape[sh.dim], 1):
        raise TPPlanError(f"output {i} of the model is split across tensor-parallel ranks "
                          f"(shape {list(shape)}) in a way zerofx cannot gather: return "
                          f"values computed after a row-parallel layer, or leave its layers "
                          f"out of the plan")
    with gm.graph.inserting_before(gm.graph.output_node()):
        return S.gather(gm.graph, out, sh.dim, tp=tp, group=ctx.tp_group)


def _explain(node: fx.Node, params, reason: str, ctx: PassContext) -> str:
    line = model_line(node)
    where = f" (model code: {line})" if line else ""
    fix = ("Leave that layer out of tensor_parallel.plan, or split the layers around it so "
           "the split ends at a row-parallel layer")
    if not ctx.config.tensor_parallel.plan:  # the layout was zerofx's choice: say so
        chosen = "; ".join(f"{c.module} {c.style} ({c.reason})" for c in ctx.plan.tp_choices)
        from_graph = all(c.reason.startswith("graph") for c in ctx.plan.tp_choices)
        fix = (f"zerofx chose the split itself ({chosen}); give tensor_parallel.plan to "
               f"choose the layers" + ("" if from_graph else
                                       ", or example_inputs= (zerofx.initialize or "
                                       "ZeroRuntime) so that zerofx reads the layout from "
                                       "the traced graph instead of guessing it from the "
                                       "module tree"))
    return (f"tensor parallelism cannot run {node.target} on values split from "
            f"{', '.join(sorted(params))}{where}: {reason}. {fix}")
