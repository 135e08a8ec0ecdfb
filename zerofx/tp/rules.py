"""Sharding propagation for the tensor_parallel pass: how a split flows through one aten op.

A value is replicated (None), a partial sum (PARTIAL: every rank holds a summand of the
true value) or split along one dimension (Shard). A Shard describes *which* elements a rank
holds, so reshapes can follow it: dimension ``dim`` of full size n is read as
(n / (f·s), f, s) and rank r holds factor indices [r·f/tp, (r+1)·f/tp) of every outer
block. A plain column split is (f=n, s=1); a fused q|k|v weight is split per part (f=n/3);
``[B, T, C] → [B, T, H, hd]`` moves a split of C onto H.

Every rule takes the input shardings and full (unsplit) shapes and returns the output
sharding, or raises Unshardable with the reason; rules never touch the graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class Unshardable(Exception):
    """This op cannot run on split inputs without communication the pass does not insert."""


@dataclass(frozen=True)
class Shard:
    dim: int
    f: int  # size of the split factor
    s: int  # elements of the dimension below the factor (its inner stride, in dim units)


PARTIAL = "partial"


def normalize(sh: Shard, size: int) -> Shard:
    """One spelling per split: a factor spanning the whole dimension is a plain split."""
    return Shard(sh.dim, size, 1) if sh.f * sh.s == size else sh


def reshape(sh: Shard, in_shape, out_shape, tp: int) -> Shard:
    """Follow a split through view/reshape (row-major element order is preserved)."""
    lo = sh.s * math.prod(in_shape[sh.dim + 1:])  # flat stride of one factor step
    hi = lo * sh.f  # flat stride just past the factor
    for j, n in enumerate(out_shape):
        st = math.prod(out_shape[j + 1:])
        if n == 1 or st >= hi:
            continue
        if lo >= st and lo % st == 0:  # the factor lies within dimension j
            return normalize(Shard(j, sh.f, lo // st), n)
        if lo < st and hi % st == 0 and (hi // st) % tp == 0 and (lo * sh.f // tp) % st == 0:
            return normalize(Shard(j, hi // st, 1), n)  # spans j and below: split j
        break
    raise Unshardable(f"reshape {list(in_shape)} -> {list(out_shape)} cuts through the split "
                      f"of dimension {sh.dim}")


def permute(sh: Shard, perm) -> Shard:
    return Shard(list(perm).index(sh.dim), sh.f, sh.s)


def moved(sh: Shard, offset: int) -> Shard:
    return Shard(sh.dim + offset, sh.f, sh.s)


def pointwise(args, out_shape) -> Shard | None:
    """Elementwise ops with broadcasting: every split input must be split the same way, and a
    replicated input must be broadcast (size 1) along the split dimension."""
    n_out, found = len(out_shape), None
    for sh, shape in args:
        if sh == PARTIAL:
            raise Unshardable("a partial sum reaches an elementwise op")
        if isinstance(sh, Shard):
            aligned = normalize(moved(sh, n_out - len(shape)), out_shape[sh.dim +
                                                                        n_out - len(shape)])
            if found is not None and aligned != found:
                raise Unshardable(f"inputs split differently ({found} vs {aligned})")
            found = aligned
    if found is None:
        return None
    for sh, shape in args:
        if sh is None and shape is not None:
            d = found.dim - (n_out - len(shape))
            if d >= 0 and shape[d] != 1:
                raise Unshardable(f"a replicated input of shape {list(shape)} meets a split "
                                  f"one along dimension {found.dim}")
    return found


def matmul(a, b, a_shape, b_shape):
    """mm / bmm: batch dims pass through; a split contraction dimension gives a partial sum."""
    nd = len(a_shape)  # 2 for mm, 3 for bmm
    m, k, kb, n = nd - 2, nd - 1, nd - 2, nd - 1
    if a == PARTIAL or b == PARTIAL:
        raise Unshardable("a partial sum reaches a matmul")
    if isinstance(a, Shard) and isinstance(b, Shard):
        if a.dim == k and b.dim == kb and normalize(a, a_shape[k]) == \
                normalize(Shard(k, b.f, b.s), b_shape[kb]):
            return PARTIAL
        if nd == 3 and a.dim == 0 and b.dim == 0 and a == b:
            return a
        raise Unshardable(f"matmul operands split along dimensions {a.dim} and {b.dim}")
    if isinstance(a, Shard) and a.dim == m and b is None:
        return a
    if isinstance(b, Shard) and b.dim == n and a is None:
        return b
    raise Unshardable("a matmul contracts a split dimension of one operand only")


def split_pieces(sh: Shard, dim: int, sizes, full_size: int, tp: int):
    """split/split_with_sizes: (local sizes, sharding of each piece)."""
    if dim != sh.dim:
        return list(sizes), [sh] * len(sizes)
    block = sh.f * sh.s
    if any(size % block for size in sizes):
        raise Unshardable(
            f"split into pieces of {list(sizes)} along a dimension split in blocks of {block}"
            f" (a fused projection? give its module a head count attribute such as 'heads' "
            f"so its parts are split separately)")
    return [size // tp for size in sizes], [normalize(sh, size) for size in sizes]


def cat(shardings, shapes, dim: int) -> Shard | None:
    split = [s for s in shardings if isinstance(s, Shard)]
    if not split:
        return None
    if len(split) != len(shardings) or PARTIAL in shardings:
        raise Unshardable("cat of split and replicated tensors")
    if dim != split[0].dim:
        aligned = {normalize(s, shape[s.dim]) for s, shape in zip(split, shapes)}
        if len(aligned) > 1:
            raise Unshardable("cat of tensors split differently")
        return split[0]
    blocks = {(s.f, s.s) if s.f * s.s != shape[dim] else (shape[dim], 1)
              for s, shape in zip(split, shapes)}
    sizes = {f * s for f, s in blocks}
    if len(sizes) != 1:
        raise Unshardable("cat along the split dimension of unequal blocks")
    f, s = blocks.pop()
    return Shard(dim, f, s)


def along(sh, dims, ndim: int):
    """An op that mixes values along ``dims`` (softmax, a mean): a split elsewhere passes."""
    dims = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}
    if sh == PARTIAL:
        raise Unshardable("a partial sum reaches a normalisation")
    if isinstance(sh, Shard) and sh.dim in dims:
        raise Unshardable(f"values are normalised along dimension {sh.dim}, which is split "
                          f"across tensor-parallel ranks")
    return sh


def reduced(sh, dims, ndim: int, keepdim: bool):
    """sum over ``dims``: a split dimension summed away gives a partial sum."""
    if not isinstance(sh, Shard):
        return sh
    dims = {d % ndim for d in dims} if dims else set(range(ndim))
    if sh.dim in dims:
        return PARTIAL
    return sh if keepdim else moved(sh, -sum(1 for d in dims if d < sh.dim))


def sliced(sh, dim: int, start, end, step, size: int):
    """slice along ``dim`` (RoPE's rotate_half halves the head dimension): a split elsewhere,
    a partial sum, or a replicated value pass through. A slice of the split dimension itself
    passes when it takes whole blocks (Phi-3's ``qkv[..., :q]`` of a fused q|k|v split per
    part): each rank slices [start/tp, end/tp) of its piece, which holds its share of every
    block. Anything else would need another rank's elements."""
    if not isinstance(sh, Shard) or dim != sh.dim:
        return sh
    bounds = slice_bounds(start, end, step, size)
    if bounds == (0, size):
        return sh
    block = sh.f * sh.s
    if bounds is not None and bounds[0] % block == 0 and bounds[1] % block == 0 and \
            bounds[1] > bounds[0]:
        return normalize(sh, bounds[1] - bounds[0])
    raise Unshardable(f"a slice [{start}:{end}:{step}] of dimension {dim}, which is split "
                      f"across tensor-parallel ranks in blocks of {block} (its pieces would "
                      f"need other ranks' elements)")


def slice_bounds(start, end, step, size: int):
    """(start, end) of a unit-step slice as non-negative ints clamped to ``size`` (Python's
    rules), or None for a strided or symbolic slice."""
    if step not in (None, 1) or not all(isinstance(v, (int, type(None))) for v in (start, end)):
        return None
    start, end = 0 if start is None else start, size if end is None else end
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    return min(max(start, 0), size), min(max(end, 0), size)


def selected(sh, dim: int, ndim: int):
    """select/unbind along ``dim`` of an ``ndim``-D value (Bloom's q, k, v out of
    [B, T, heads, 3, hd]): a split elsewhere moves down past the removed dimension; selecting
    within the split dimension would need one rank's elements on every rank."""
    if not isinstance(sh, Shard):
        return sh
    dim %= ndim
    if dim == sh.dim:
        raise Unshardable(f"a select along dimension {dim}, which is split across "
                          f"tensor-parallel ranks")
    return moved(sh, -1) if dim < sh.dim else sh


def stacked(shardings, shapes, dim: int):
    """stack along a new dimension ``dim`` (GPT-J's rotary code): every input split the same
    way (or all replicated); the split moves up past the new dimension."""
    if PARTIAL in shardings:
        raise Unshardable("a partial sum reaches a stack")
    split = [s for s in shardings if isinstance(s, Shard)]
    if not split:
        return None
    aligned = {normalize(s, shape[s.dim]) for s, shape in zip(shardings, shapes)
               if isinstance(s, Shard)}
    if len(split) != len(shardings) or len(aligned) > 1:
        raise Unshardable("stack of tensors split differently (or split and replicated)")
    sh = aligned.pop()
    return moved(sh, 1) if dim % (len(shapes[0]) + 1) <= sh.dim else sh
