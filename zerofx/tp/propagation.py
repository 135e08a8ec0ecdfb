"""How a tensor-parallel split flows through one aten node of a traced graph (pure: the graph
is never touched).

Two users: the tensor_parallel pass, which then rewrites the node (local shape constants,
all-reduces after partial sums, slices of replicated operands), and the layout discovery
(tp/discovery.py), which tries candidate splits on a traced forward graph before any weight
is split. Both must agree on what is shardable, so the decision lives here once.

``state`` maps nodes to their sharding (absent or None: replicated; tp_rules.PARTIAL; a
tp_rules.Shard); ``full`` maps nodes to their full (unsplit) shapes.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

import zerofx.tp.rules as R

aten = torch.ops.aten

VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
PASS_THROUGH = {aten._to_copy.default, aten.clone.default, aten.detach.default,
                aten.alias.default, aten.contiguous.default, aten.native_dropout.default}
SOFTMAX = {aten._softmax.default, aten._log_softmax.default,
           aten._safe_softmax.default}  # _safe_softmax: softmax, fully masked rows 0
# Megatron's vocabulary-parallel ops: they run on a split vocabulary with collectives the
# pass adds (passes/tensor_parallel/vocab.py): the embedding lookup (masked, partial sums), the
# cross-entropy's log-softmax (max and sum of exponentials all-reduced) and its NLL (the
# target's log-probability from the rank that holds it).
VOCAB_PARALLEL = {aten.embedding.default, aten._log_softmax.default,
                  aten._log_softmax_backward_data.default, aten.nll_loss_forward.default,
                  aten.nll_loss_backward.default}
# Attention kernels: heads (dim 1 of every 4-D operand) are independent.
HEAD_PARALLEL = {getattr(aten, n).default for n in (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
) if hasattr(aten, n)}


# The ops whose rules follow R.Regions (the rest refuse them, see infer): views and
# transposes, matmuls, the cuts and joins of a fused projection, elementwise ops.
REGION_OPS = VIEWS | PASS_THROUGH | {
    operator.getitem, aten.t.default, aten.transpose.int, aten.permute.default,
    aten.expand.default, aten.unsqueeze.default, aten.mm.default, aten.addmm.default,
    aten.slice.Tensor, aten.slice_backward.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.cat.default, aten.index.Tensor,
    aten._unsafe_index.Tensor}


def shapes(val):
    """Full shapes as ints: a dynamic (symbolic) size counts by its hint. Only the weights'
    dimensions are split, and those are static; the rules just need the layout."""
    if isinstance(val, torch.Tensor):
        return tuple(_concrete(d) for d in val.shape)
    if isinstance(val, (tuple, list)):
        return [shapes(v) for v in val]
    return None


def _concrete(size) -> int:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else int(size)
    return int(size)


def is_elementwise(target) -> bool:
    return target in PASS_THROUGH or torch.Tag.pointwise in getattr(target, "tags", ())


def may_localize(target) -> bool:
    """Ops whose replicated operands may be sliced to a split one's part: elementwise ops,
    cat, attention (a per-head bias or mask beside heads split across ranks), and a matmul
    whose other operand is split along the contracted dimension (the incoming gradient of
    split logits, whole, times a vocabulary-split LM head: a partial sum)."""
    return target in (aten.cat.default, aten.baddbmm.default, aten.index_put.default,
                      aten._unsafe_index_put.default) or target in HEAD_PARALLEL \
        or is_elementwise(target) or target in (aten.mm.default, aten.bmm.default)


def cat_dim(node: fx.Node, full) -> int | None:
    """The dimension a cat joins along (None for other ops)."""
    if node.target is not aten.cat.default:
        return None
    return (node.args[1] if len(node.args) > 1 else 0) % len(full[node])


def localized(node: fx.Node, state, full, *, along: int | None = None) -> dict:
    """{replicated input: the split each rank's slice of it has}, where a split value meets a
    whole replicated one in an op that works elementwise along the split dimension
    (pointwise ops; cat ``along`` another dimension). The replicated one holds every rank's
    part, so each rank can use its own slice (a redistribution, no communication)."""
    if node.target in (aten.mm.default, aten.bmm.default):
        return _contracted(node, state, full)
    out = full[node][0] if isinstance(full[node], list) else full[node]
    ins = node.all_input_nodes
    split = next(((state[a], full[a]) for a in ins
                  if isinstance(state.get(a), (R.Shard, R.Regions))), None)
    if split is None or out is None or any(state.get(a) == R.PARTIAL for a in ins):
        return {}
    sh, shape = split
    d_out = sh.dim + len(out) - len(shape)
    if d_out == along:  # cat along the split dimension itself: no slice of it fits
        return {}
    found = {}
    for a in ins:
        if state.get(a) is not None or not full.get(a) or isinstance(full[a], list):
            continue
        d = d_out - (len(out) - len(full[a]))
        if d >= 0 and full[a][d] == shape[sh.dim] and full[a][d] != 1:
            found[a] = R.moved(sh, d - sh.dim)
    return found


def _contracted(node: fx.Node, state, full) -> dict:
    """mm/bmm(a, b) with one operand split along the contracted dimension and the other
    whole: each rank takes its slice of the whole one; the product is a partial sum. A bmm
    with one operand's batch split and the other whole: each rank takes its batches."""
    a, b = node.args[:2]
    k, kb = len(full[a]) - 1, len(full[b]) - 2
    sa, sb = state.get(a), state.get(b)
    if node.target is aten.bmm.default:  # a batch of heads split, the other's whole (a
        # multi-query key expanded to every query head by attention's math kernel): each
        # rank takes its heads' batches of the whole one
        if isinstance(sa, R.Shard) and sa.dim == 0 and sb is None and \
                full[a][0] == full[b][0]:
            return {b: sa}
        if isinstance(sb, R.Shard) and sb.dim == 0 and sa is None and \
                full[a][0] == full[b][0]:
            return {a: sb}
    if isinstance(sb, (R.Shard, R.Regions)) and sb.dim == kb and sa is None:
        return {a: R.moved(sb, k - kb)}
    if isinstance(sa, (R.Shard, R.Regions)) and sa.dim == k and sb is None:
        return {b: R.moved(sa, kb - k)}
    return {}


def infer(node: fx.Node, state, full, tp: int):
    """The output sharding of ``node`` from its inputs' (Unshardable where no rule fits):
    the rules RULES holds for its op, in registration order (a rule returning
    NotImplemented passes to the next), then the elementwise rule.

    Replicated operands that ``localized`` would slice count as sliced: the pass inserts
    those slices before asking, the discovery only imagines them."""
    t = node.target
    extra = localized(node, state, full, along=cat_dim(node, full)) \
        if may_localize(t) else {}

    def get(a):
        return extra[a] if a in extra else state.get(a)

    if t is not operator.getitem and any(isinstance(get(a), R.GroupPartial)
                                         for a in node.all_input_nodes):
        raise R.Unshardable(f"a key/value gradient not yet summed over its rank group "
                            f"reaches {t}")
    if t not in REGION_OPS and t not in HEAD_PARALLEL and not is_elementwise(t) and any(
            isinstance(get(a), R.Regions) for a in node.all_input_nodes):
        raise R.Unshardable(f"values cut into regions of unequal sizes (a fused q|k|v with "
                            f"grouped key/value heads) reach {t}, which has no rule for them")
    for fn in RULES.get(t, ()):
        out = fn(node, get, full, tp)
        if out is not NotImplemented:
            return out
    if is_elementwise(t):
        tensors = [(get(a), full[a]) for a in node.all_input_nodes]
        out = R.pointwise(tensors, full[node] if not isinstance(full[node], list)
                          else full[node][0])
        return [out] * len(full[node]) if isinstance(full[node], list) else out
    raise R.Unshardable(f"no tensor-parallel rule for {t}")


# op -> its rules, each ``rule(node, get, full, tp) -> sharding | NotImplemented`` where
# ``get(value)`` is an input's sharding and ``full[value]`` its full shape. A new op is one
# decorated function (autoparallel's register_rule, in miniature).
RULES: dict = {}


def rule(*targets):
    """Register the decorated function as a rule of ``targets`` (after those already there)."""
    def register(fn):
        for t in targets:
            RULES.setdefault(t, []).append(fn)
        return fn
    return register


def first_operand(node, get):
    """The sharding of the node's first operand (None when it is not a graph value)."""
    a = node.args[0] if node.args else None
    return get(a) if isinstance(a, fx.Node) else None


@rule(operator.getitem)
def _getitem(node, get, full, tp):
    sh = first_operand(node, get)
    return sh[node.args[1]] if isinstance(sh, list) else None


@rule(*VIEWS)
def _view(node, get, full, tp):
    return R.reshape(first_operand(node, get), full[node.args[0]], full[node], tp)


@rule(aten.t.default, aten.transpose.int, aten.permute.default)
def _permute(node, get, full, tp):
    args = node.args
    return R.permute(first_operand(node, get),
                     _permutation(node.target, args, len(full[args[0]])))


@rule(aten.expand.default)
def _expand(node, get, full, tp):
    return R.moved(first_operand(node, get), len(node.args[1]) - len(full[node.args[0]]))


@rule(aten.unsqueeze.default)
def _unsqueeze(node, get, full, tp):
    sh, args = first_operand(node, get), node.args
    d = args[1] % (len(full[args[0]]) + 1)
    return R.moved(sh, 1 if d <= sh.dim else 0)


@rule(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(node, get, full, tp):  # size-1 dimensions dropped: the split moves down past them
    sh, args = first_operand(node, get), node.args
    if not isinstance(sh, R.Shard):
        return sh  # replicated or a partial sum: unchanged by dropping size-1 dimensions
    shape = full[args[0]]
    dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    gone = {d % len(shape) for d in dims if shape[d % len(shape)] == 1}
    if sh.dim in gone:  # (a split dimension is never of size 1)
        raise R.Unshardable(f"squeeze drops the split dimension {sh.dim}")
    return R.moved(sh, -sum(d < sh.dim for d in gone))


@rule(aten.mm.default, aten.bmm.default)
def _mm(node, get, full, tp):
    a, b = node.args[:2]
    return R.matmul(get(a), get(b), full[a], full[b])


@rule(aten.sum.dim_IntList, aten.sum.default)
def _sum(node, get, full, tp):
    args = node.args
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
    keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
    return R.reduced(first_operand(node, get), dims, len(full[args[0]]), keep)


@rule(aten.native_layer_norm.default)
def _layer_norm(node, get, full, tp):  # (x, shape, w, b, eps) -> (y, mean, rstd)
    return [_token_wise(node, get, full, node.args[0], len(node.args[1]))] * 3


@rule(aten.native_layer_norm_backward.default)
def _layer_norm_backward(node, get, full, tp):
    # (grad, x, shape, mean, rstd, w, b, mask) -> (dx, dw, db): dw, db sum over tokens
    args = node.args
    sh = R.pointwise([(get(args[0]), full[args[0]]), (get(args[1]), full[args[1]])],
                     full[args[1]])
    sh = R.along(sh, range(len(full[args[1]]) - len(args[2]), len(full[args[1]])),
                 len(full[args[1]]))
    if any(get(a) is not None for a in args[5:7] if isinstance(a, fx.Node)):
        raise R.Unshardable("a LayerNorm with split weights")
    return [sh, R.PARTIAL, R.PARTIAL]


@rule(aten._softmax_backward_data.default)
def _softmax_backward(node, get, full, tp):  # (grad, output, dim, dtype)
    args = node.args
    return R.along(R.pointwise([(get(args[0]), full[args[0]]),
                                (get(args[1]), full[args[1]])], full[node]),
                   args[2], len(full[node]))


@rule(aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
      aten.full_like.default, aten.bernoulli_.float, aten.bernoulli.p)  # (dropout's mask,
# as a forward run without grad records it: empty_like, bernoulli_, div_)
def _like(node, get, full, tp):  # a fresh tensor of its operand's shape: the same pieces
    return first_operand(node, get)


@rule(aten.mean.dim)
def _mean(node, get, full, tp):  # a mean over a split dimension is no partial sum: refused
    args = node.args
    dims = args[1] if args[1] is not None else range(len(full[args[0]]))
    return R.reduced(R.along(first_operand(node, get), dims, len(full[args[0]])), dims,
                     len(full[args[0]]),
                     args[2] if len(args) > 2 else node.kwargs.get("keepdim", False))


@rule(*VOCAB_PARALLEL)
def _vocab_parallel(node, get, full, tp):
    """Vocabulary-parallel ops on a split vocabulary (NotImplemented: not split that way, the
    ordinary rules decide)."""
    t, args = node.target, node.args
    if t is aten.embedding.default:  # (weight [V, d], ids, ...): rows of the vocabulary
        w, ids = get(args[0]), get(args[1])
        if isinstance(w, R.Shard) and w.dim == 0 and ids is None and \
                R.normalize(w, full[args[0]][0]) == R.Shard(0, full[args[0]][0], 1):
            return R.PARTIAL  # rows held elsewhere look up zeros: summed over the ranks
        return NotImplemented
    if t is aten._log_softmax.default:  # (x, dim, half_to_float)
        sh = get(args[0])
        return sh if _splits_whole(sh, args[1], full[args[0]]) else NotImplemented
    if t is aten._log_softmax_backward_data.default:  # (grad, output, dim, dtype)
        sh = R.pointwise([(get(args[0]), full[args[0]]), (get(args[1]), full[args[1]])],
                         full[node])
        return sh if _splits_whole(sh, args[2], full[node]) else NotImplemented
    # nll_loss_forward(logp, target, weight, reduction, ignore_index) -> (loss, total)
    # nll_loss_backward(grad, logp, target, weight, reduction, ignore_index, total)
    logp = args[0] if t is aten.nll_loss_forward.default else args[1]
    sh, rest = get(logp), [a for a in node.all_input_nodes if a is not logp]
    if not _splits_whole(sh, 1 if len(full[logp]) > 1 else 0, full[logp]):
        return NotImplemented
    if any(get(a) is not None for a in rest) or (args[2 if logp is args[0] else 3]
                                                 is not None):
        raise R.Unshardable("a vocabulary-parallel loss with class weights or a split "
                            "target")
    return [None, None] if t is aten.nll_loss_forward.default else sh


def _splits_whole(sh, dim: int, shape) -> bool:
    """``sh`` is a plain (one-block) split of dimension ``dim``."""
    return isinstance(sh, R.Shard) and sh.dim == dim % len(shape) and \
        R.normalize(sh, shape[sh.dim]) == R.Shard(sh.dim, shape[sh.dim], 1)


def _token_wise(node, get, full, x, k: int):
    """A norm over the last ``k`` dimensions of ``x``: a split of the others (tokens) passes,
    a split of the normalised ones is refused; split weights are refused."""
    nd = len(full[x])
    if any(get(a) is not None for a in node.all_input_nodes if a is not x):
        raise R.Unshardable("a LayerNorm with split weights")
    return R.along(get(x), range(nd - k, nd), nd)


def _permutation(t, args, nd: int) -> list[int]:
    perm = list(range(nd))
    if t is aten.permute.default:
        return [d % nd for d in args[1]]
    if nd == 2 or t is aten.transpose.int:
        a, b = (0, 1) if t is aten.t.default else (args[1] % nd, args[2] % nd)
        perm[a], perm[b] = perm[b], perm[a]
    return perm


@rule(aten.addmm.default)
def _addmm(node, get, full, tp):
    """addmm(bias, a, b): a partial-sum matmul takes its bias once, after the all-reduce
    (Megatron's row-parallel layer: the pass makes it mm + add)."""
    bias, a, b = node.args[:3]
    mm = R.matmul(get(a), get(b), full[a], full[b])
    if mm != R.PARTIAL:
        return R.pointwise([(mm, full[node]), (get(bias), full[bias])], full[node])
    if get(bias) is not None or node.kwargs or len(node.args) > 3:
        raise R.Unshardable("a row-parallel addmm with a split or scaled bias")
    return R.PARTIAL


@rule(*HEAD_PARALLEL)
def _head_parallel(node, get, full, tp: int):
    """Attention: every 4-D operand with more than one head is split evenly by heads
    (dimension 1). With grouped-query attention the key/value heads are fewer: a rank's
    query heads are then exactly the ones that read its key/value heads as long as the split
    is even (query head i reads kv head i // (heads / kv_heads))."""
    four_d = [a for a in node.all_input_nodes if len(full[a] or ()) == 4 and full[a][1] != 1]
    grouped = {full[a][1] for a in four_d if _grouped_heads(get(a), full[a][1], tp)}
    for a in four_d:
        sh, n = get(a), full[a][1]
        if not (isinstance(sh, R.Shard) and sh.dim == 1 and R.normalize(sh, n) ==
                R.Shard(1, n, 1) and n % tp == 0) and n not in grouped:
            raise R.Unshardable("attention operands are not all split evenly by heads "
                                "(dimension 1)")
    heads = sorted({full[a][1] for a in four_d})
    if any(h % heads[0] for h in heads) or (grouped and heads[-1] in grouped):
        raise R.Unshardable(f"attention head counts {heads} are not multiples of each other"
                            f" (or the query heads are grouped)")
    outs = full[node] if isinstance(full[node], list) else [full[node]]
    # A one-head key/value (multi-query) is broadcast to every query head and stays whole
    # on every rank: its gradient from a backward kernel sums over this rank's query heads
    # only, a partial sum (all-reduced by the pass), not a replicated value. Grouped
    # key/value heads (fewer than the ranks, one per rank group): the gradient holds this
    # rank's query heads' share of its group's, summed over the group by the pass.
    backward = node.target.__name__.split(".")[0].endswith("_backward")
    if not backward and any(o is not None and len(o) >= 3 and o[1] in grouped
                            for o in outs):
        raise R.Unshardable("an attention output with as many heads as the grouped "
                            "key/value heads")
    return [R.GroupPartial(R.Regions(1, (o[1],), (o[1],))) if backward and o is not None
            and len(o) == 4 and o[1] in grouped else
            R.Shard(1, o[1], 1) if o is not None and len(o) >= 3 and o[1] in heads and
            o[1] not in grouped else
            R.PARTIAL if backward and o is not None and len(o) == 4 and o[1] == 1 else None
            for o in outs]


def _grouped_heads(sh, n: int, tp: int) -> bool:
    """``sh`` holds ``n`` key/value heads in n groups, one head per rank group (fewer heads
    than ranks): rank r holds head r·n // tp, the one its query heads read (query head i
    reads i // (heads / n), and rank r holds query heads [r·heads/tp, (r+1)·heads/tp))."""
    return isinstance(sh, R.Regions) and sh.dim == 1 and sh.sizes == (n,) and \
        sh.whole == (n,) and 1 < n < tp and tp % n == 0


@rule(*SOFTMAX)  # after the vocabulary rule: a log-softmax over a split vocabulary is its
def _softmax(node, get, full, tp):  # (x, dim, ...): normalised along dim, independent
    sh = first_operand(node, get)  # across others
    return R.along(sh, node.args[1], len(full[node.args[0]]))


@rule(aten.baddbmm.default)
def _baddbmm(node, get, full, tp):
    """baddbmm(bias, a, b): Bloom's scores, alibi + q @ k^T over [B*heads, T, hd]. The bmm
    splits like any (batch of heads split: its heads' scores), the bias adds elementwise (a
    whole alibi is sliced to this rank's heads); a contracted split would add the bias on
    every rank, refused."""
    bias, a, b = node.args[:3]
    mm = R.matmul(get(a), get(b), full[a], full[b])
    if mm == R.PARTIAL:
        raise R.Unshardable("a baddbmm whose matmul is a partial sum (its bias would be "
                            "added on every rank)")
    return R.pointwise([(mm, full[node]), (get(bias), full[bias])], full[node])


# the rules of ops that cut, join and index values along a dimension (a module of their own;
# importing it registers them in RULES)
import zerofx.tp.propagation_cuts  # noqa: E402,F401
