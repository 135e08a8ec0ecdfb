"""Megatron's layout read from the model's traced forward graph, not from names.

    trace:    model(**example) under make_fx, parameters as placeholders, by name
    weights:  every 2-D parameter read only as a matmul's weight (nn.Linear through t(),
              Hugging Face's Conv1D directly), with the dimension that gives output features
              and the bias its addmm adds
    regions:  in graph order, each weight not yet placed seeds a region: its output features
              split (column-parallel), the split propagated by the tensor_parallel pass's
              own rules (tp_propagation). Where it is blocked, the region grows:
                a matmul contracts the split features with a replicated weight
                    -> that weight is row-parallel (its output is a partial sum, all-reduced)
                an op meets a replicated operand computed by another weight's matmul
                    (attention's k and v beside q, a gated MLP's up beside gate)
                    -> that weight is column-parallel too
                a split cuts the features into equal pieces (a fused q|k|v)
                    -> the weight is split per piece
              and propagation starts over. A region that ends in row-parallel weights is
              kept; one that reaches anything else (a norm, the loss, an embedding) is not.

The same rules then run on the joint graph in the tensor_parallel pass, which proves the
layout there (backward included) or names the op it cannot shard.
"""
from __future__ import annotations

import heapq
import itertools
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from zerofx.fx_source import model_line, short_line
import zerofx.tp.propagation as P
import zerofx.tp.rules as R
from zerofx.tp.propagation_cuts import index_values

aten = torch.ops.aten
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}
_MATMULS = {aten.mm.default, aten.addmm.default}
_VOCAB_ENDS = {str(aten.embedding.default), str(aten.nll_loss_forward.default)}
# What a replicated operand may be computed through from a weight's matmul output, for
# that weight to join a region (views, attention's rotary embedding, activations).
_CARRIERS = P.VIEWS | _TRANSPOSES | {aten.expand.default, aten.unsqueeze.default,
                                     aten.slice.Tensor, aten.cat.default,
                                     aten.split.Tensor, aten.split_with_sizes.default}


@dataclass(frozen=True)
class Weight:
    """A 2-D parameter read only as the weight of matmuls."""

    name: str
    node: fx.Node  # its placeholder
    out_dim: int  # the parameter dimension that becomes output features
    bias: fx.Node | None  # the parameter every one of its addmms adds (None: none, or mixed)
    bias_name: str | None
    first_use: int  # graph position of its first use: seeds go in this order
    lookup: bool  # an embedding table (maybe also the LM head): vocabulary-parallel
    tied: bool  # a table that is also the LM head


@dataclass(frozen=True)
class Found:
    """One weight the discovery splits."""

    name: str
    style: str  # "colwise" | "rowwise"
    parts: int
    dim: int  # the split dimension of the parameter
    bias: str | None
    reason: str
    regions: tuple = ()  # unequal parts [(size, whole)] instead of ``parts`` (TPShard's)


def trace_forward(model: torch.nn.Module, example) -> tuple[fx.GraphModule, list[str]]:
    """The model's forward, run once eagerly (no grad) on ``example``, recorded as an aten
    graph whose first placeholders are its parameters (``named_parameters()`` order, tied
    ones once). ``example``: a dict of keyword arguments, a tuple of positional ones, or one
    tensor. Recorded below autograd, so the ops are the ones AOTAutograd's graphs hold; run
    eagerly, so data-dependent Python (``.item()``, ``if mask.all()``) just runs."""
    names, params = zip(*model.named_parameters())
    args, kwargs = ((), dict(example)) if isinstance(example, dict) else \
        (tuple(example) if isinstance(example, (tuple, list)) else (example,), {})
    graph = fx.Graph()
    recorder = _Recorder(graph)
    for name, p in zip(names, params):
        # "p_": a name must be an identifier (nn.Sequential's parameters are "0.weight")
        recorder.name(p, graph.placeholder("p_" + name.replace(".", "_")))
    with torch.no_grad(), recorder:
        model(*args, **kwargs)
    return fx.GraphModule(torch.nn.Module(), graph), list(names)


class _Recorder(TorchDispatchMode):
    """Records every aten call into ``graph``; a tensor not made by a recorded call (an
    input, a buffer, a constant) becomes a placeholder. Holds every tensor it saw, so no
    id is reused while recording."""

    def __init__(self, graph: fx.Graph):
        super().__init__()
        self.graph, self.nodes, self.keep = graph, {}, []

    def name(self, t: torch.Tensor, node: fx.Node) -> fx.Node:
        node.meta["val"] = t
        self.nodes[id(t)] = node
        self.keep.append(t)
        return node

    def _node_of(self, a):
        if not isinstance(a, torch.Tensor):
            return a
        node = self.nodes.get(id(a))
        return node if node is not None else \
            self.name(a, self.graph.placeholder(f"input_{len(self.keep)}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not pytree.tree_any(lambda o: isinstance(o, torch.Tensor), out):
            # metadata queries (prim.device, which fake tensors answer through dispatch)
            # produce no tensor: recorded, they would count as uses of a weight
            return out
        node = self.graph.call_function(func, pytree.tree_map(self._node_of, tuple(args)),
                                        pytree.tree_map(self._node_of, kwargs))
        if isinstance(out, torch.Tensor):
            self.name(out, node)
        elif isinstance(out, (tuple, list)):
            node.meta["val"] = list(out)
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self.name(o, self.graph.call_function(operator.getitem, (node, i)))
        return out


def find_weights(gm: fx.GraphModule, names: list[str]) -> dict[str, Weight]:
    """{name: Weight} for the 2-D parameters every use of which is a matmul's weight operand
    or an embedding lookup's table (a table's rows are its output features: the vocabulary,
    also when the table is tied to the LM head)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    name_of = dict(zip(placeholders, names))
    for ph, name in name_of.items():
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 2:
            continue
        uses = _weight_uses(ph)
        dims = {d for _, d in uses}
        if not uses or len(dims) != 1:
            continue
        biases = {mm.args[0] if mm.target is aten.addmm.default and mm.args[0] in name_of
                  else None for mm, _ in uses if mm.target in _MATMULS}
        bias = biases.pop() if len(biases) == 1 else None
        lookup = any(u.target is aten.embedding.default for u, _ in uses)
        tied = lookup and any(u.target in _MATMULS for u, _ in uses)
        found[name] = Weight(name, ph, dims.pop(), bias, name_of.get(bias),
                             min(order[u] for u, _ in uses), lookup, tied)
    return found


def _weight_uses(ph: fx.Node):
    """[(use, output-feature dimension of the parameter)] if every use of ``ph`` is as the
    right operand of mm/addmm (through transposes) or as an embedding's table, else []."""
    uses, frontier = [], [(ph, [0, 1])]
    while frontier:
        node, perm = frontier.pop()  # perm[i]: the parameter dimension at position i
        for user in node.users:
            if user.target in _TRANSPOSES and node is user.args[0]:
                frontier.append((user, list(reversed(perm))))
            elif user.target in _MATMULS and user.args[-1 if user.target is aten.mm.default
                                                      else 2] is node and \
                    sum(a is node for a in user.args) == 1:
                uses.append((user, perm[1]))  # b is [k, n]: position 1 is the output
            elif user.target is aten.embedding.default and user.args[0] is node is ph:
                uses.append((user, 0))  # a table's rows
            else:
                return []
    return uses


def discover(gm: fx.GraphModule, weights: dict[str, Weight], tp: int, *,
             vocab: bool = True, whole: dict | None = None) -> list[Found]:
    """The weights to split and how, region by region (see the module docstring). With
    ``vocab``, embedding tables and LM heads whose split reaches the cross-entropy are split
    over the vocabulary too (Megatron's vocabulary-parallel layers). ``whole`` (if given)
    receives {projection weight left whole: why}, for the plan dump and a warning."""
    full = {n: P.shapes(n.meta.get("val")) for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_node = {w.node: w for w in weights.values()}
    # Megatron splits the word embedding, not the position or token-type tables: a lookup
    # table is split when it is also the LM head, or has as many rows as a loss has classes
    classes = {full[n.args[0]][-1] for n in gm.graph.nodes
               if n.target is aten.nll_loss_forward.default}
    word = {w.node for w in weights.values()
            if w.lookup and (w.tied or full[w.node][0] in classes)}
    by_node = {n: w for n, w in by_node.items() if not w.lookup or (vocab and n in word)}
    placed: dict[str, Found] = {}
    why = {}
    for seed in sorted(by_node.values(), key=lambda w: w.first_use):
        if seed.name not in placed:
            region, why[seed.name] = _grow(seed, placed, by_node, full, order, tp, vocab)
            placed.update(region)
    if whole is not None:
        split = {n for n, w in by_node.items() if w.name in placed}
        whole.update({w.name: _one_head_kv(w, split, full) or why.get(w.name) or
                      "no region of split weights ends at it"
                      for w in by_node.values() if not w.lookup and w.name not in placed})
    return list(placed.values())


_ONE_HEAD = ("one key/value head, read by every rank's query heads: whole on every rank "
             "(its rank group is all the ranks, as Megatron replicates it), its gradient "
             "summed over the ranks")


def _one_head_kv(w: Weight, split: set, full) -> str | None:
    """_ONE_HEAD if ``w``'s output reaches an attention kernel as a one-head key or value
    beside query heads computed from a split weight (multi-query attention), else None."""
    def reach(start, through_ok):
        stack, seen, out = list(start), set(), set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            for u in v.users:
                if u.target in P.HEAD_PARALLEL:
                    out.add((u, v))
                elif through_ok(u):
                    stack.append(u)
        return out

    def carried(u):
        return u.target in _CARRIERS or u.target is operator.getitem or \
            P.is_elementwise(u.target) or u.target in _MATMULS
    mine = {(u, v) for u, v in reach([w.node], carried) if full[v] and len(full[v]) == 4
            and full[v][1] == 1}
    theirs = {u for u, v in reach(split, carried) if full[v] and len(full[v]) == 4
              and full[v][1] > 1}
    return _ONE_HEAD if any(u in theirs for u, _ in mine) else None


def _grow(seed: Weight, placed, by_node, full, order, tp: int, vocab: bool):
    """(the region grown from ``seed``: {name: Found}, or {} with why it could not be)."""
    n = full[seed.node][seed.out_dim]
    if n % tp:  # uneven pieces would reach shapes no rule can follow (a 255-row vocabulary)
        what = "rows (vocabulary)" if seed.lookup else "output features"
        return {}, (f"its {n} {what} do not divide over {tp} ranks (Megatron pads them; "
                    f"zerofx keeps the weight whole)")
    col, row = {seed.node: 1}, set()
    seen: list[str] = []
    for _ in range(4 * len(by_node) + 4):  # each round adds a weight or a part count
        free = {n: w for n, w in by_node.items() if w.name not in placed
                and n not in col and n not in row}
        blocked = _propagate(col, row, by_node, free, full, order, tp, seen)
        if blocked is None:
            # a region ends where its split is summed away: row-parallel weights, an
            # embedding lookup, the cross-entropy (vocabulary-parallel)
            ends = row or (vocab and any(t in _VOCAB_ENDS for t in seen))
            return (_region(col, row, by_node, seen), "") if ends else \
                ({}, "its output features are never summed back (no row-parallel weight)")
        node, state = blocked
        if not _repair(node, state, col, row, free, by_node, full, tp) and \
                not _keep_small_regions_whole(col, tp):
            return {}, (f"the split of its output features over {tp} ranks cannot pass "
                        f"{node.target}{_where(node)}{_hint(node, full, tp)}")
    return {}, "no layout settled"


def _hint(node, full, tp: int) -> str:
    """Why a blocked node may have blocked: the heads it sees against the ranks."""
    if node.target in P.VIEWS:
        return " (fewer heads than ranks?)"
    if node.target not in P.HEAD_PARALLEL:
        return ""
    heads = sorted({full[a][1] for a in node.all_input_nodes
                    if len(full[a] or ()) == 4 and full[a][1] > 1})
    if heads and heads[0] < tp and heads[0] < heads[-1]:
        kind = "replicated over rank groups" if tp % heads[0] == 0 else \
            f"replicated over rank groups (which needs them to divide {tp})"
        return (f" (its {heads[0]} key/value heads are fewer than the {tp} ranks: {kind}, "
                f"they did not fit either)")
    return ""


def _keep_small_regions_whole(col, tp: int) -> bool:
    """Regions of a fused projection smaller than its largest (grouped or multi-query key
    and value heads beside the query heads) split in vain: cut them into fewer pieces, each
    held by a group of ranks (key/value heads fewer than the ranks, replicated per rank
    group), then whole on every rank; one step down per call."""
    for node, spec in col.items():
        if isinstance(spec, tuple):
            big = max(n for n, _ in spec)
            fewer = tuple((n, _fewer(w, n, tp) if n < big and w is not True else w)
                          for n, w in spec)
            if fewer != spec:
                col[node] = fewer
                return True
    return False


def _fewer(w, n: int, tp: int):
    """The next layout of a region of ``n`` rows after ``w`` (False: split over the tp
    ranks; g: in g rank groups): the next smaller group count g > 1 dividing tp and n,
    else whole on every rank (True)."""
    g = tp if w is False else int(w)
    return next((k for k in range(g - 1, 1, -1) if tp % k == 0 and n % k == 0), True)


def _group_heads(node, col, by_node, full, tp: int) -> bool:
    """A view blocked by a weight split plainly into more pieces than it has heads (Llama's
    k_proj with 2 key/value heads over 4 ranks: [.., 16] -> [.., 2, 8]): cut it into
    fewer pieces instead, each held by a group of ranks (the next step of ``_fewer``; never
    whole, for a separate weight: that is leaving it out of the region)."""
    src = _producer(node.args[0], col)
    if src is None:
        return False
    n, spec = full[src][by_node[src].out_dim], col[src]
    w = False if spec == 1 else spec[0][1] if isinstance(spec, tuple) and len(spec) == 1 \
        else None
    nxt = _fewer(w, n, tp) if w is not None and w is not True else True
    if nxt is True:
        return False
    col[src] = ((n, nxt),)
    return True


def _where(node: fx.Node) -> str:
    """`` at file.py:NN code`` from the node's stack trace, if it has one."""
    line = model_line(node)
    return f" at {short_line(line)}" if line else ""


def _propagate(col, row, by_node, free, full, order, tp, seen):
    """Propagate the region's splits (in graph order, only where they reach); None when
    nothing blocks them, else (the blocking node, the state so far). An elementwise op that
    would slice a replicated operand computed by a free weight (a gated MLP's up beside
    gate), or that would slice a free weight itself (a matmul contracting the split: that
    weight is row-parallel), blocks too: splitting that weight saves computing what is
    sliced away. ``seen``
    collects the ops the split went through (for the reason the plan dump shows)."""
    seen.clear()
    state = {}
    for node, spec in col.items():
        w = by_node[node]
        state[node] = _split_of(spec, w.out_dim, full[node][w.out_dim])
        if w.bias is not None:
            state[w.bias] = _split_of(spec, 0, full[w.bias][0])
    for node in row:
        d = 1 - by_node[node].out_dim
        state[node] = R.Shard(d, full[node][d], 1)
    heap = [(order[u], u) for n in state for u in n.users]
    heapq.heapify(heap)
    done = set(state)
    while heap:
        _, node = heapq.heappop(heap)
        if node in done or node.op != "call_function":
            continue
        done.add(node)
        if P.may_localize(node.target) and any(
                _weight_of(a, free) is not None or _feeding_weights(a, free, state)
                for a in P.localized(node, state, full, along=P.cat_dim(node, full))):
            return node, state  # split that weight (or make it row-parallel) instead
        if node.target is aten.cat.default and any(
                state.get(a) is None and _feeding_weights(a, free, state)
                for a in node.args[0]) and any(state.get(a) is not None for a in node.args[0]):
            return node, state  # joined whole beside split values: split that weight too
        try:
            out = P.infer(node, state, full, tp)
        except (R.Unshardable, AttributeError, TypeError, IndexError):
            # no rule, or a rule meeting an operand layout it was not written for (the pass
            # would refuse it too): either way the split cannot pass here
            return node, state
        seen.append(str(node.target))
        if out is not None and out != R.PARTIAL:
            state[node] = out
            for u in node.users:
                heapq.heappush(heap, (order[u], u))
    return None


def _repair(node, state, col, row, free, by_node, full, tp) -> bool:
    """Grow the region so that ``node`` can run (module docstring); False: nothing fits."""
    if node.target in _MATMULS:  # the split features meet a replicated weight: row-parallel
        a, b = node.args[-2], node.args[-1]
        w, sh = _weight_of(b, free), state.get(a)
        if w is not None and isinstance(sh, R.Shard) and sh.dim == len(full[a]) - 1 and \
                full[w][1 - free[w].out_dim] % tp == 0:
            row.add(w)
            return True
    if node.target in _CUTS:
        return _fuse(node, col, by_node, full, tp)
    if node.target in P.VIEWS:  # a view of a fused weight's output that its cuts fix
        # (Falcon multi-query at 4 ranks: [.., 6 heads, hd], then split [4, 1, 1])
        if any(_fuse(u, col, by_node, full, tp) for u in node.users if u.target in _CUTS):
            return True
        if _group_heads(node, col, by_node, full, tp):
            return True
    joined = set()
    for a in node.all_input_nodes:
        if state.get(a) is None:
            joined |= _feeding_weights(a, free, state)
    joined = {w for w in joined if full[w][free[w].out_dim] % tp == 0}
    col.update({w: 1 for w in joined})
    return bool(joined)


_CUTS = {aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor,
         aten.index.Tensor}


def _fuse(node, col, by_node, full, tp: int) -> bool:
    """A split or slice cuts a region weight's output features (through views): a fused
    projection (GPT-2's q|k|v split, Phi-3's q, k, v slices, a gated MLP's chunks). The
    weight is split per part, in the largest equal parts whose boundaries include the cut's
    (each rank then holds its share of every part: Megatron's interleaving), and
    propagation starts over; it proves the parts right (whole heads per rank, query heads
    beside their key/value heads) or blocks again. False: no such parts (uneven cuts, or
    parts that do not divide over the ranks), the weight stays whole."""
    x, args = node.args[0], node.args
    src, shape = _producer(x, col), full[x]
    if src is None:
        return False
    n = full[src][by_node[src].out_dim]
    if node.target is aten.index.Tensor:  # constant positions (Falcon's qkv[..., [-2], :])
        at = [(d, i) for d, i in enumerate(args[1]) if i is not None]
        if len(at) != 1 or not isinstance(at[0][1], fx.Node):
            return False
        dim, values = at[0][0], index_values(at[0][1], shape[at[0][0]])
        if not values:
            return False
    else:
        dim = (args[1] if node.target is aten.slice.Tensor else
               (args[2] if len(args) > 2 else 0)) % len(shape)
    feat = next((k for k in range(len(shape)) if math.prod(shape[k:]) == n), None)
    if feat is None or dim < feat:
        return False
    inner, period = math.prod(shape[dim + 1:]), math.prod(shape[dim:])
    if node.target is aten.index.Tensor:  # each position picked: cut on both sides
        cuts = sorted({c for v in values for c in (v, v + 1)})
    elif node.target is aten.slice.Tensor:
        bounds = R.slice_bounds(*(list(args[2:5]) + [None] * 3)[:3], shape[dim])
        if bounds is None:
            return False
        cuts = list(bounds)
    else:
        cuts = list(itertools.accumulate(p[dim] for p in full[node]))
    if period == n:  # cuts of the features themselves: the regions between them
        return _cut_regions(col, src, n, inner, [c * inner for c in cuts], tp)
    if isinstance(col[src], tuple):
        return False
    block = math.gcd(n // col[src], period, *(c * inner for c in cuts))
    if block == n // col[src] or block % tp:
        return False
    col[src] = n // block
    return True


def _cut_regions(col, src, n: int, unit: int, cuts, tp: int) -> bool:
    """Cut ``src``'s features (n) at ``cuts`` too: the regions between all cuts, each split
    over the ranks where it holds a multiple of ``tp`` units (heads, when the cut is of
    heads), else whole on every rank. Equal split regions are the equal parts of
    Megatron's interleaved fused q|k|v; unequal ones its grouped-query layout. False: no
    new cut."""
    spec = col[src]
    old = [0] + list(itertools.accumulate(z for z, _ in spec)) if isinstance(spec, tuple) \
        else list(range(0, n + 1, n // spec))
    bounds = sorted(set(old) | {c for c in cuts if 0 < c < n} | {0, n})
    was = list(zip(old, spec)) if isinstance(spec, tuple) else []  # (start, (size, whole))
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        w = next((w for at, (size, w) in was if at <= lo < at + size), False)
        if w is not False and not isinstance(w, bool) and (lo, hi) not in \
                {(at, at + size) for at, (size, _) in was}:
            w = True  # a piece of a region in rank groups: whole (its groups were others)
        pieces.append((hi - lo, w if w is not False else
                       bool((hi - lo) % unit or ((hi - lo) // unit) % tp)))
    sh = R.regions(0, pieces)
    if sh is None or regions_or_parts(sh, n) == spec:  # nothing (new) to split
        return False
    col[src] = regions_or_parts(sh, n)
    return True


def regions_or_parts(sh, n: int):
    """Equal split regions are ``n / block`` parts; anything else stays regions."""
    return n // (sh.f * sh.s) if isinstance(sh, R.Shard) else tuple(zip(sh.sizes, sh.whole))


def _split_of(spec, dim: int, n: int):
    """A region weight's split: ``spec`` equal parts, or regions [(size, whole)]."""
    if isinstance(spec, tuple):
        return R.regions(dim, spec)
    return R.normalize(R.Shard(dim, n // spec, 1), n)


def _weight_of(value: fx.Node, among) -> fx.Node | None:
    """The weight placeholder ``value`` is (through transposes), if it is ``among`` these."""
    while value.target in _TRANSPOSES:
        value = value.args[0]
    return value if value in among else None


def _producer(value: fx.Node, col) -> fx.Node | None:
    """The region weight whose matmul output ``value`` is (through views)."""
    while value.op == "call_function" and value.target in P.VIEWS:
        value = value.args[0]
    if value.op == "call_function" and value.target in _MATMULS:
        return _weight_of(value.args[-1], col)
    return None


def _feeding_weights(value: fx.Node, free, state) -> set[fx.Node]:
    """Free weights whose matmul output ``value`` is computed from through views, rotary
    slices and elementwise ops, where that matmul's input is itself replicated."""
    found, stack, seen = set(), [value], set()
    while stack:
        v = stack.pop()
        if v in seen or v.op != "call_function":
            continue
        seen.add(v)
        if v.target in _MATMULS:
            w = _weight_of(v.args[-1], free)
            if w is not None and state.get(v.args[-2]) is None:
                found.add(w)
        elif v.target in _CARRIERS or v.target is operator.getitem or \
                P.is_elementwise(v.target):
            stack.extend(v.all_input_nodes)
    return found


def _region(col, row, by_node, seen) -> dict[str, Found]:
    through = "attention" if any("attention" in t or "bmm" in t for t in seen) else \
        "elementwise ops"
    ends = ", ".join(sorted(by_node[n].name for n in row))
    if not row:
        ends = "the cross-entropy (vocabulary-parallel)" \
            if str(aten.nll_loss_forward.default) in seen else "summed lookups"
    out = {}
    for node, spec in col.items():
        w = by_node[node]
        parts, regions = (len(spec), spec) if isinstance(spec, tuple) else (spec, ())
        fused = "" if parts == 1 else f", {parts} equal pieces (a fused projection)"
        if regions:
            whole = " or whole on every rank" if any(wh is True for _, wh in regions) else ""
            groups = sorted({wh for _, wh in regions if not isinstance(wh, bool)})
            if groups:
                whole += (f" or in {groups[0]} rank groups (key/value heads fewer than the "
                          f"ranks: each on the ranks whose query heads read it)")
            fused = (f", regions of {[z for z, _ in regions]} rows split on their own{whole}"
                     + (" (a fused q|k|v with grouped or multi-query key/value heads)"
                        if len(regions) > 1 else ""))
        if w.lookup:
            style, reason = "vocab", (f"graph: an embedding table split by rows (vocabulary)"
                                      f"; its split reaches {ends}")
        else:
            style, reason = "colwise", f"graph: output features reach {ends}" + (
                f" through {through}{fused}" if row else "")
        out[w.name] = Found(w.name, style, parts, w.out_dim, w.bias_name, reason, regions)
    for node in row:
        w = by_node[node]
        out[w.name] = Found(w.name, "rowwise", 1, 1 - w.out_dim, None,
                            f"graph: contracts the features split by "
                            f"{', '.join(sorted(by_node[c].name for c in col))}")
    return out
