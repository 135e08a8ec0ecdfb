"""Megatron's vocabulary-parallel layers, as rewrites the tensor_parallel pass applies where a
vocabulary split reaches an embedding or a cross-entropy (tp_propagation.VOCAB_PARALLEL).

Rank r holds rows [r·V/tp, (r+1)·V/tp) of the vocabulary (start = r·V/tp, per = V/tp):

    embedding(W, ids)               -> masked_fill(embedding(W_r, safe(ids)), outside, 0)
                                       (a partial sum: the pass all-reduces it)
    embedding_dense_backward(g, ids, V, ...)
                                    -> embedding_dense_backward(g, spare(ids), per + 1, ...)
                                       [:per]   (other ranks' rows land in a dropped row)
    _log_softmax(x, -1)             -> x - m - log(all_reduce_sum(sum(exp(x - m))))
                                       with m = all_reduce_max(amax(x))
    _log_softmax_backward_data(g, y, -1)
                                    -> g - exp(y) · all_reduce_sum(sum(g))
    nll_loss_forward(lp, t, reduction=mean)
                                    -> all_reduce_sum(nll_loss_forward(lp_r, local(t), sum))
                                       / count(t != ignore_index)
    nll_loss_backward(g, lp, t, ..., total)
                                    -> nll_loss_backward(g, lp_r, local(t), ..., global total)

where safe(ids) is ids - start where the row is this rank's and 0 elsewhere, and local(t)
is t - start where the target is this rank's (and not ignore_index) and -1 elsewhere, with
-1 as the local calls' ignore_index: a local index can never be taken for the user's
ignore_index. Full logits are never gathered for the loss: only [tokens] values cross
ranks.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

import zerofx.tp.rules as R

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
_MEAN = 1  # nll_loss's reduction codes: 0 none, 1 mean, 2 sum
_LOCAL_IGNORE = -1  # never a local row index


def rewrite(node: fx.Node, out, state, full, *, tp: int, tp_rank: int, group: str) -> None:
    """Rewrite ``node`` (whose output sharding tp_propagation gave as ``out``) to run on this
    rank's part of the vocabulary."""
    t, args = node.target, node.args
    if t is aten.embedding.default and out == R.PARTIAL:
        _embedding(node, state, full, tp, tp_rank)
    elif t is aten._log_softmax.default and _along(out, args[1], full[node]):
        _log_softmax(node, group)
    elif t is aten._log_softmax_backward_data.default and _along(out, args[2], full[node]):
        _log_softmax_backward(node, group)
    elif t is aten.nll_loss_forward.default and _along(state.get(args[0]), 1, full[args[0]]):
        _nll_forward(node, full, tp, tp_rank, group)
    elif t is aten.nll_loss_backward.default and _along(out, 1, full[node]):
        logp, target = node.args[1], node.args[2]
        per = full[logp][-1] // tp
        with node.graph.inserting_before(node):
            local = _local_targets(node.graph, target, per, tp_rank, node.args[5])
        grad, weight, reduction, total = node.args[0], node.args[3], node.args[4], node.args[6]
        node.args = (grad, logp, local, weight, reduction, _LOCAL_IGNORE, total)


def _along(sh, dim: int, shape) -> bool:
    """``sh`` splits the class (vocabulary) dimension ``dim``: the rewrites apply only then
    (a split of tokens flows through these ops untouched)."""
    return isinstance(sh, R.Shard) and len(shape) > 0 and sh.dim == dim % len(shape)


def _call(graph: fx.Graph, op, *args, **kwargs) -> fx.Node:
    return graph.call_function(op, args, kwargs)


def _all_reduce(graph: fx.Graph, x: fx.Node, how: str, group: str) -> fx.Node:
    return _call(graph, _c10d.wait_tensor.default,
                 _call(graph, _c10d.all_reduce.default, x, how, group))


def _in_range(graph, ids, per: int, rank: int):
    """(ids - start, whether the row is this rank's)."""
    local = _call(graph, aten.sub.Scalar, ids, rank * per)
    inside = _call(graph, aten.logical_and.default, _call(graph, aten.ge.Scalar, local, 0),
                   _call(graph, aten.lt.Scalar, local, per))
    return local, inside


def _embedding(node, state, full, tp: int, tp_rank: int) -> None:
    """The lookup on this rank's rows, zeros for the others (summed by the pass's
    all-reduce); the backward lookups of the same ids get this rank's rows alike."""
    graph, (weight, ids, *rest) = node.graph, node.args
    vocab = full[weight][0]
    if any(u.target is aten.embedding.default and u.args[0] is not weight
           and full[u.args[0]][0] == vocab for u in ids.users):
        # their gradients would be told apart by the table size only
        raise R.Unshardable("two embedding tables of one size look up the same ids")
    per = vocab // tp
    if rest and rest[0] not in (None, -1):  # padding_idx: a row index, local or none
        pad = rest[0] - tp_rank * per
        rest[0] = pad if 0 <= pad < per else -1
    with graph.inserting_before(node):
        local, inside = _in_range(graph, ids, per, tp_rank)
        safe = _call(graph, aten.where.ScalarOther, inside, local, 0)
        looked = _call(graph, aten.embedding.default, weight, safe, *rest)
        outside = _call(graph, aten.unsqueeze.default,
                        _call(graph, aten.logical_not.default, inside), -1)
    node.target, node.args = aten.masked_fill.Scalar, (looked, outside, 0.0)
    for user in list(ids.users):  # the gradient of the table: this rank's rows only
        if user.target is aten.embedding_dense_backward.default and user.args[1] is ids \
                and user.args[2] == vocab:
            _rows_gradient(user, inside, local, per, rest[0] if rest else -1, state, full)


def _rows_gradient(user, inside, local, per: int, pad: int, state, full) -> None:
    """embedding_dense_backward(g, ids, V, ...) -> its first ``per`` rows of
    embedding_dense_backward(g, ids - start or ``per``, per + 1, ...): lookups of other
    ranks' rows land in a spare row that is dropped. The incoming gradient is not masked,
    so it may stay split over tokens (sequence parallelism) until the op gathers it."""
    graph = user.graph
    grad, _, vocab, pad_b, scale = user.args
    with graph.inserting_before(user):
        spare = _call(graph, aten.where.ScalarOther, inside, local, per)
    user.args = (grad, spare, per + 1, -1 if pad_b in (None, -1) else pad, scale)
    with graph.inserting_after(user):
        rows = _call(graph, aten.slice.Tensor, user, 0, 0, per)
    user.replace_all_uses_with(rows, delete_user_cb=lambda u: u is not rows)
    full[rows] = (vocab, *full[user][1:])
    state.presets[rows] = R.Shard(0, vocab, 1)  # whatever its input's sharding


def _log_softmax(node, group: str) -> None:
    x, dim = node.args[0], node.args[1]
    graph = node.graph
    with graph.inserting_before(node):
        m = _all_reduce(graph, _call(graph, aten.amax.default, x, [dim], True), "max", group)
        shifted = _call(graph, aten.sub.Tensor, x, m)
        total = _all_reduce(graph, _call(graph, aten.sum.dim_IntList,
                                         _call(graph, aten.exp.default, shifted), [dim], True),
                            "sum", group)
        log_total = _call(graph, aten.log.default, total)
    node.target, node.args, node.kwargs = aten.sub.Tensor, (shifted, log_total), {}


def _log_softmax_backward(node, group: str) -> None:
    grad, out, dim = node.args[:3]
    graph = node.graph
    with graph.inserting_before(node):
        total = _all_reduce(graph, _call(graph, aten.sum.dim_IntList, grad, [dim], True), "sum",
                            group)
        scaled = _call(graph, aten.mul.Tensor, _call(graph, aten.exp.default, out), total)
    node.target, node.args, node.kwargs = aten.sub.Tensor, (grad, scaled), {}


def _local_targets(graph, target, per: int, rank: int, ignore_index: int) -> fx.Node:
    local, inside = _in_range(graph, target, per, rank)
    kept = _call(graph, aten.logical_and.default, inside,
                 _call(graph, aten.ne.Scalar, target, ignore_index))
    return _call(graph, aten.where.ScalarOther, kept, local, _LOCAL_IGNORE)


def _nll_forward(node, full, tp: int, tp_rank: int, group: str) -> None:
    """Each rank sums the losses of the targets it holds; the sum is all-reduced and divided
    by the count of targets that are not ignored (what the whole loss divides by)."""
    logp, target, weight, reduction, ignore = node.args
    graph = node.graph
    per = full[logp][-1] // tp
    with graph.inserting_before(node):
        local = _local_targets(graph, target, per, tp_rank, ignore)
    # reduction none stays none (per-token losses, zero where another rank holds the
    # target); mean and sum become sum, divided by the global count below
    node.args = (logp, local, weight, 0 if reduction == 0 else 2, _LOCAL_IGNORE)
    users = [u for u in node.users if u.target is operator.getitem]
    with graph.inserting_after(node):
        part = _call(graph, operator.getitem, node, 0)
    with graph.inserting_before(part.next):  # in order (inserting_after would reverse)
        loss = _all_reduce(graph, part, "sum", group)
        counted = _call(graph, aten.ne.Scalar, target, ignore)
        total = _call(graph, aten.sum.default, counted, dtype=logp.meta["val"].dtype)
        if reduction == _MEAN:
            loss = _call(graph, aten.div.Tensor, loss, total)
    for user in users:
        user.replace_all_uses_with(loss if user.args[1] == 0 else total)
