"""Megatron's sequence parallelism, as the tensor_parallel pass applies it
(``tensor_parallel.sequence_parallel``).

Between tensor-parallel regions the activations are whole on every rank; with sequence
parallelism each rank keeps only its tokens there, so norms, dropout and residual adds run
on 1/tp of the tokens and their activations take 1/tp of the memory:

    row-parallel out:   all_reduce(partial)      -> reduce_scatter(partial)    [N/tp, d]
    norms, residuals:   whole values             -> this rank's tokens (a whole operand
                                                    such as the first residual is sliced)
    column-parallel in: x                        -> all_gather(x's tokens)     [N, d]

The same two rules run in backward: a column-parallel layer's input gradient (a partial sum)
is reduce-scattered into the tokens' gradient, and a token-split gradient is all-gathered
where an op needs every token (a weight's gradient, the embedding's). Token splits are
tracked as their own set, so a split of features that reaches a norm is still an error.
"""
from __future__ import annotations

import torch
from torch import fx

import zerofx.tp.rules as R

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional


def scatters(node: fx.Node, full, tp: int) -> bool:
    """Whether a partial sum ``node`` is reduce-scattered over tokens (its first dimension,
    the flattened batch x sequence of a matmul) rather than all-reduced."""
    shape = full[node]
    return isinstance(shape, tuple) and len(shape) >= 2 and shape[0] % tp == 0


def reduce_scatter_after(node: fx.Node, state, full, tokens: set, *, tp: int,
                         group: str) -> None:
    """Sum the partial results of ``node`` and keep this rank's block of its first dimension."""
    graph = node.graph
    with graph.inserting_after(node):
        rs = graph.call_function(_c10d.reduce_scatter_tensor.default, (node, "sum", tp, group))
    with graph.inserting_after(rs):
        done = graph.call_function(_c10d.wait_tensor.default, (rs,))
    node.replace_all_uses_with(done, delete_user_cb=lambda u: u is not rs)
    state[rs], state[done] = R.PARTIAL, R.Shard(0, full[node][0], 1)
    full[rs] = full[done] = full[node]
    tokens.add(done)


def gather_tokens(node: fx.Node, state, full, tokens: set, *, tp: int, group: str) -> bool:
    """All-gather the token-split operands of ``node`` before it (their whole values replace
    them there); False when it has none to gather."""
    swap = {}
    for a in node.all_input_nodes:
        sh = state.get(a)
        if a in tokens and isinstance(sh, R.Shard) and \
                R.normalize(sh, full[a][sh.dim]) == R.Shard(sh.dim, full[a][sh.dim], 1):
            with node.graph.inserting_before(node):
                swap[a] = gather(node.graph, a, sh.dim, tp=tp, group=group)
            state[swap[a]], full[swap[a]] = None, full[a]
    if swap:
        node.args = fx.node.map_arg(node.args, lambda a: swap.get(a, a))
        node.kwargs = fx.node.map_arg(node.kwargs, lambda a: swap.get(a, a))
    return bool(swap)


def gather(graph: fx.Graph, value: fx.Node, dim: int, *, tp: int, group: str) -> fx.Node:
    """The whole of a value split evenly along ``dim``, contiguous as the unsplit value is
    (all_gather_into_tensor gathers along the first dimension: the split one is moved there
    and back; moved back it is a view with the split dimension outermost in memory, a layout
    every later reshape, ``view`` or kernel would copy again, and a model output the user sees:
    Hugging Face's loss upcasts such logits and copies the fp32 result once more)."""
    front = graph.call_function(aten.movedim.int, (value, dim, 0))
    front = graph.call_function(aten.clone.default, (front,),
                                {"memory_format": torch.contiguous_format})
    g = graph.call_function(_c10d.all_gather_into_tensor.default, (front, tp, group))
    g = graph.call_function(_c10d.wait_tensor.default, (g,))
    if dim == 0:
        return g
    back = graph.call_function(aten.movedim.int, (g, 0, dim))
    return graph.call_function(aten.clone.default, (back,),
                               {"memory_format": torch.contiguous_format})
