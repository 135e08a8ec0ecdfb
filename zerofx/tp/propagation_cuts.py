"""Sharding rules of the ops that cut, join and index values along a dimension: split,
slice (and its backward), cat, select, unbind, stack, advanced index (and its index_put
backward), and fresh tensors made after an operand. Fused projections are cut by these
(Phi-3's q, k, v slices, Bloom's selects out of [.., heads, 3, hd], Falcon's index of its key
and value, GPT-J's rotary stack); registered in tp/propagation.py's RULES on import.
"""
from __future__ import annotations

import torch
from torch import fx

import zerofx.tp.rules as R
from zerofx.tp.propagation import first_operand, rule

aten = torch.ops.aten
# node.meta key: a slice's arguments as traced (full bounds), kept by the tensor_parallel
# pass when it makes them local, for the slice_backward that mirrors the slice
TRACED_ARGS = "zerofx_tp_traced_args"


@rule(aten.split.Tensor, aten.split_with_sizes.default)
def _split(node, get, full, tp):
    args = node.args
    dim = (args[2] if len(args) > 2 else 0) % len(full[args[0]])
    return R.split_pieces(first_operand(node, get), dim, [p[dim] for p in full[node]],
                          full[args[0]][dim], tp)[1]


@rule(aten.slice_backward.default)
def _slice_backward(node, get, full, tp):  # (grad, input_sizes, dim, start, end, step)
    """The gradient of a slice, laid out as the sliced value was: a slice of whole blocks
    gives blocks again; a slice of one region of a value cut into regions (Phi-3's k of
    [q | k | v] with grouped heads) gives those regions, found on the forward slice the
    backward mirrors (the other regions are zeros, whatever their layout)."""
    args, sh = node.args, first_operand(node, get)
    dim = args[2] % len(args[1])
    template = _forward_regions(node, get, full, dim) if isinstance(
        sh, (R.Shard, R.Regions)) and sh.dim == dim else None
    if template is not None:
        if R.sliced(template, dim, args[3], args[4], args[5], args[1][dim]) != \
                R._normal(sh, full[args[0]][dim]):
            raise R.Unshardable("the gradient of a slice of regions is split unlike the "
                                "slice")
        return template
    return R.sliced(sh, dim, args[3], args[4], args[5], args[1][dim])


def _forward_regions(node, get, full, dim: int):
    """R.Regions of the value a forward slice with ``node``'s (slice_backward) sizes and
    bounds cut, or None."""
    sizes, start, end, step = node.args[1:2] + node.args[3:6]
    bounds = R.slice_bounds(start, end, step, sizes[dim])
    found = set()
    for n in node.graph.nodes:
        if n.target is not aten.slice.Tensor:
            continue
        args = n.meta.get(TRACED_ARGS, n.args)  # as traced, before the pass localised them
        if full.get(args[0]) == tuple(sizes) and \
                (args[1] if len(args) > 1 else 0) % len(sizes) == dim and \
                R.slice_bounds(*(list(args[2:5]) + [None] * 3)[:3], sizes[dim]) == bounds:
            sh = get(n.args[0])
            if isinstance(sh, R.Regions):
                found.add(sh)
    if len(found) > 1:
        raise R.Unshardable("slices of the same bounds of values cut into different regions")
    return found.pop() if found else None


@rule(aten.slice.Tensor)
def _slice(node, get, full, tp):
    args = node.args
    dim = (args[1] if len(args) > 1 else 0) % len(full[args[0]])
    start, end, step = (list(args[2:]) + [None, None, None])[:3]
    return R.sliced(first_operand(node, get), dim, start, end, step, full[args[0]][dim])


@rule(aten.cat.default)
def _cat(node, get, full, tp):
    args = node.args
    dim = (args[1] if len(args) > 1 else 0) % len(full[node])
    # torch.cat skips 1-D empty tensors whatever the others' shapes (HF's empty cache)
    kept = [a for a in args[0] if not legacy_empty(full[a], full[node])]
    return R.cat([get(a) for a in kept], [full[a] for a in kept], dim)


def legacy_empty(shape, out_shape) -> bool:
    """A 1-D empty tensor joined to N-D ones (torch.cat skips it)."""
    return shape is not None and tuple(shape) == (0,) and len(out_shape) != 1


@rule(aten.select.int)
def _select(node, get, full, tp):  # (x, dim, index): Bloom's q, k, v of [B, T, H, 3, hd]
    return R.selected(first_operand(node, get), node.args[1], len(full[node.args[0]]))


@rule(aten.unbind.int)
def _unbind(node, get, full, tp):  # (x, dim=0) -> one value per index along dim
    args = node.args
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    return [R.selected(first_operand(node, get), dim, len(full[args[0]]))] * len(full[node])


@rule(aten.select_backward.default)
def _select_backward(node, get, full, tp):  # (grad, input_sizes, dim, index)
    sh, args = first_operand(node, get), node.args
    if not isinstance(sh, R.Shard):
        return sh
    return R.moved(sh, 1) if args[2] % len(args[1]) <= sh.dim else sh


@rule(aten.stack.default)
def _stack(node, get, full, tp):  # (tensors, dim=0)
    args = node.args
    return R.stacked([get(a) for a in args[0]], [full[a] for a in args[0]],
                     args[1] if len(args) > 1 else 0)


def _one_index(indices, full):
    """(dim, index node) of an advanced index with one index tensor (Falcon's
    ``qkv[:, :, :, [-2]]``), else Unshardable."""
    at = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(at) != 1 or not isinstance(at[0][1], fx.Node):
        raise R.Unshardable("advanced indexing with several index tensors")
    val = at[0][1].meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype in (torch.bool, torch.uint8):
        raise R.Unshardable("indexing by a mask (it spans several dimensions)")
    return at[0]


# ops an index constant goes through on its way from the traced Python list to the index
_CONSTANT_CARRIERS = {aten.lift_fresh.default, aten.lift_fresh_copy.default,
                      aten.clone.default, aten.detach.default, aten.alias.default,
                      aten._to_copy.default}


def index_values(idx: fx.Node, size: int) -> list[int] | None:
    """The values of a constant 1-D integer index tensor (a Python list in the model, such
    as Falcon's ``qkv[..., [-2], :]``), made non-negative against ``size``; None when they
    are not known while compiling (computed, an input, or not 1-D)."""
    node = idx
    while node.op == "call_function" and node.target in _CONSTANT_CARRIERS:
        node = node.args[0]
    if node.op == "get_attr":  # a tensor constant of a traced graph module
        val = node.graph.owning_module
        for part in str(node.target).split("."):
            val = getattr(val, part, None)
    else:
        val = node.meta.get("val")
        if isinstance(val, torch._subclasses.FakeTensor):
            val = getattr(val, "constant", None)  # a small constant keeps its values
        elif node.op != "placeholder":
            val = None  # computed in the graph: its values are the run's
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or val.is_floating_point() or \
            val.dtype in (torch.bool, torch.uint8) or \
            isinstance(val, torch._subclasses.FakeTensor) or val.device.type == "meta":
        return None
    out = [int(v) + size if int(v) < 0 else int(v) for v in val.tolist()]
    return out if all(0 <= v < size for v in out) else None


def index_as_slice(node, sh, full):
    """(dim, start, end) of the full value when ``node`` (index.Tensor) picks a
    consecutive ascending run of positions along the dimension ``sh`` (Regions) cuts, all
    inside regions every rank holds whole (Falcon multi-query's key and value heads out of
    [.., heads + 2, hd]): each rank then takes them as a slice of its piece. Unshardable
    otherwise."""
    x, indices = node.args[:2]
    d, idx = _one_index(indices, full)
    size = full[x][d]
    values = index_values(idx, size)
    if values is None:
        raise R.Unshardable(f"an index along dimension {d}, which is cut into regions, by "
                            f"values not known while compiling")
    if not values or values != list(range(values[0], values[0] + len(values))):
        raise R.Unshardable(f"an index {values} along dimension {d}, which is cut into "
                            f"regions, that is not a run of consecutive positions")
    start, end = values[0], values[-1] + 1
    if R.sliced(sh, d, start, end, 1, size) is not None:
        raise R.Unshardable(f"an index {values} along dimension {d} picks positions of a "
                            f"region split across tensor-parallel ranks")
    return d, start, end


@rule(aten.index.Tensor, aten._unsafe_index.Tensor)
def _index(node, get, full, tp):  # (x, indices): one index tensor, along another dimension
    """Along another dimension than the split one, the split moves past the index's
    dimensions; along a dimension cut into regions, constant positions inside regions held
    whole on every rank are whole (index_as_slice: the pass makes it a local slice); along
    a split dimension, or by a split index, refused."""
    x, indices = node.args[:2]
    d, idx = _one_index(indices, full)
    sh = get(x)
    if isinstance(sh, R.Regions) and sh.dim == d and get(idx) is None:
        index_as_slice(node, sh, full)
        return None
    if get(idx) is not None or (isinstance(sh, (R.Shard, R.Regions)) and sh.dim == d):
        raise R.Unshardable(f"an index along dimension {d}, which is split (or a split "
                            f"index)")
    if not isinstance(sh, (R.Shard, R.Regions)):
        return sh
    return R.moved(sh, len(full[idx]) - 1) if sh.dim > d else sh


@rule(aten.index_put.default, aten._unsafe_index_put.default)
def _index_put(node, get, full, tp):  # (self, indices, values, accumulate): its backward
    x, indices, values = node.args[:3]
    d, idx = _one_index(indices, full)
    sh, sv = get(x), get(values)
    if len(full[idx]) != 1 or get(idx) is not None or R.PARTIAL in (sh, sv) or \
            not isinstance(sh, R.Shard) or sh.dim == d:
        raise R.Unshardable("an index_put along the split dimension, or into a value not "
                            "split like the values put")
    if not isinstance(sv, R.Shard) or R.normalize(sv, full[values][sv.dim]) != \
            R.normalize(sh, full[values][sh.dim]):  # (whole values are sliced beforehand)
        raise R.Unshardable("an index_put of values split differently from its target")
    return sh


@rule(aten.new_zeros.default, aten.new_empty.default, aten.new_ones.default,
      aten.new_full.default)
def _fresh(node, get, full, tp):  # a new tensor of the traced (full) size: its operand only
    return None  # gives the dtype and device, so it is whole, like a constant
