"""Sharding propagation for the tensor_parallel pass: how a split flows through one aten op.

A value is replicated (None), a partial sum (PARTIAL: every rank holds a summand of the
true value) or split along one dimension (Shard). A Shard describes *which* elements a rank
holds, so reshapes can follow it: dimension ``dim`` of full size n is read as
(n / (f·s), f, s) and rank r holds factor indices [r·f/tp, (r+1)·f/tp) of every outer
block. A plain column split is (f=n, s=1); a fused q|k|v weight is split per part (f=n/3);
``[B, T, C] → [B, T, H, hd]`` moves a split of C onto H. A dimension cut into regions of
unequal sizes, each split on its own or held whole by every rank (Regions), is Megatron's
layout of a fused q|k|v with grouped or multi-query key/value heads. A region may also be
cut into g groups (g < tp, dividing it), each held alike by the tp/g ranks whose query heads
read it: key/value heads fewer than the ranks, replicated per rank group.

Every rule takes the input shardings and full (unsplit) shapes and returns the output
sharding, or raises Unshardable with the reason; rules never touch the graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


class Unshardable(Exception):
    """This op cannot run on split inputs without communication the pass does not insert."""


@dataclass(frozen=True)
class Shard:
    dim: int
    f: int  # size of the split factor
    s: int  # elements of the dimension below the factor (its inner stride, in dim units)


def ways(w, tp: int) -> int:
    """Distinct pieces of a region over ``tp`` ranks: ``w`` False (split: tp), True (whole
    on every rank: 1) or a group count g (rank r holds piece r·g // tp)."""
    return tp if w is False else 1 if w is True else int(w)


def is_whole(w) -> bool:
    return w is True


def _norm_w(w):
    """One spelling of a region's ``whole``: False, True or a group count of at least 2."""
    if isinstance(w, bool):
        return w
    return False if w == 0 else True if w == 1 else int(w)


@dataclass(frozen=True)
class GroupPartial:
    """A key/value gradient out of attention's backward where the key/value heads are
    grouped (Regions ``of``, one head per group): each rank holds its own query heads'
    share of its group's gradient; summed over the group's ranks it is the group's value
    (the tensor_parallel pass sums it right there)."""

    of: "Regions"


@dataclass(frozen=True)
class Regions:
    """Dimension ``dim`` made of consecutive regions of unequal sizes (a fused
    [q: H·hd | k: KV·hd | v: KV·hd] with grouped or multi-query key/value heads), Megatron's
    GQA layout: each region is split over the ranks on its own (rank r holds its r-th
    1/tp, so a rank's query heads sit beside the key/value heads they read) or, where
    ``whole``, held whole by every rank (a multi-query key/value head beside split query
    heads), or, where ``whole`` is a group count g, cut into g groups, rank r holding
    group r·g // tp (key/value heads fewer than the ranks: each replicated over the tp/g
    ranks whose query heads read it, see ``ways``). A rank's piece is its part of every
    region, in order."""

    dim: int
    sizes: tuple[int, ...]
    whole: tuple[bool | int, ...]

    def local_sizes(self, tp: int) -> list[int]:
        return [n // ways(w, tp) for n, w in zip(self.sizes, self.whole)]

    def local_bounds(self, start: int, end: int, tp: int) -> tuple[int, int]:
        """[start, end) of the full dimension in a rank's piece: on region boundaries, or
        within a whole region (which every rank holds entirely)."""
        return self._local_at(start, tp), self._local_at(end, tp)

    def _local_at(self, pos: int, tp: int) -> int:
        at = local = 0
        for n, w, m in zip(self.sizes, self.whole, self.local_sizes(tp)):
            if pos == at or (is_whole(w) and at < pos < at + n):
                return local + pos - at
            at, local = at + n, local + m
        if pos == at:
            return local
        raise Unshardable(f"a cut at {pos} of regions {list(self.sizes)} splits a region "
                          f"split across tensor-parallel ranks")

    def cut(self, start: int, end: int):
        """The regions [start, end) covers (parts of whole ones included)."""
        self._local_at(start, 1), self._local_at(end, 1)  # raises where it cuts a split one
        at, kept = 0, []
        for n, w in zip(self.sizes, self.whole):
            lo, hi = max(at, start), min(at + n, end)
            if lo < hi:
                kept.append((hi - lo, w))
            at += n
        return regions(self.dim, kept)


PARTIAL = "partial"


def regions(dim: int, pieces) -> "Shard | Regions | None":
    """One spelling of a dimension cut into ``pieces`` [(size, whole)]: adjacent whole
    regions merge (a rank holds all of both), all whole is replicated (None), equal split
    regions are a Shard of blocks (what a fused q|k|v of equal parts always was)."""
    merged: list[list] = []
    for n, w in pieces:
        w = _norm_w(w)
        if n == 0:
            continue
        if merged and is_whole(w) and is_whole(merged[-1][1]):
            merged[-1][0] += n  # (grouped regions never merge: each is grouped on its own)
        else:
            merged.append([n, w])
    if all(is_whole(w) for _, w in merged):
        return None
    sizes = tuple(n for n, _ in merged)
    if all(w is False for _, w in merged) and len(set(sizes)) == 1:
        return normalize(Shard(dim, sizes[0], 1), sum(sizes))
    return Regions(dim, sizes, tuple(w for _, w in merged))


def pieces_of(sh, size: int) -> list[tuple[int, bool]]:
    """The [(size, whole)] regions a split, a replicated value or Regions make of a
    dimension of ``size`` elements."""
    if sh is None:
        return [(size, True)]
    if isinstance(sh, Regions):
        return list(zip(sh.sizes, sh.whole))
    block = sh.f * sh.s
    return [(block, False)] * (size // block)


def local_size(sh, size: int, tp: int) -> int:
    """The size a rank holds of a split dimension of ``size`` elements."""
    return sum(sh.local_sizes(tp)) if isinstance(sh, Regions) else size // tp


def _regions_reshape(sh: Regions, in_shape, out_shape, tp: int):
    """Regions through a view: the dimension may be cut into (outer, inner) with region
    boundaries on outer (Falcon's [.., (H+2)·hd] -> [.., H+2, hd]), merged with inner
    dimensions below it, or kept."""
    lo = math.prod(in_shape[sh.dim + 1:])
    hi = lo * in_shape[sh.dim]
    for j, n in enumerate(out_shape):
        st = math.prod(out_shape[j + 1:])
        if n == 1 or st * n != hi:
            continue
        if st == lo:
            return replace(sh, dim=j)
        if st > lo and st % lo == 0 and all(z % (st // lo) == 0 for z in sh.sizes):
            sizes = tuple(z // (st // lo) for z in sh.sizes)
            if all(is_whole(w) or z % ways(w, tp) == 0 for z, w in zip(sizes, sh.whole)):
                return regions(j, zip(sizes, sh.whole))
        if st < lo and lo % st == 0:
            return regions(j, [(z * lo // st, w) for z, w in zip(sh.sizes, sh.whole)])
        break
    raise Unshardable(f"reshape {list(in_shape)} -> {list(out_shape)} cuts through the "
                      f"regions {list(sh.sizes)} of dimension {sh.dim}")


def normalize(sh: Shard, size: int) -> Shard:
    """One spelling per split: a factor spanning the whole dimension is a plain split."""
    return Shard(sh.dim, size, 1) if sh.f * sh.s == size else sh


def reshape(sh: Shard, in_shape, out_shape, tp: int) -> Shard:
    """Follow a split through view/reshape (row-major element order is preserved)."""
    if isinstance(sh, Regions):
        return _regions_reshape(sh, in_shape, out_shape, tp)
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


def permute(sh, perm):
    return replace(sh, dim=list(perm).index(sh.dim))


def moved(sh, offset: int):
    return replace(sh, dim=sh.dim + offset)


def pointwise(args, out_shape) -> Shard | None:
    """Elementwise ops with broadcasting: every split input must be split the same way, and a
    replicated input must be broadcast (size 1) along the split dimension."""
    n_out, found = len(out_shape), None
    for sh, shape in args:
        if sh == PARTIAL:
            raise Unshardable("a partial sum reaches an elementwise op")
        if isinstance(sh, (Shard, Regions)):
            aligned = _normal(moved(sh, n_out - len(shape)), out_shape[sh.dim +
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


def _normal(sh, size: int):
    return sh if isinstance(sh, Regions) else normalize(sh, size)


def matmul(a, b, a_shape, b_shape):
    """mm / bmm: batch dims pass through; a split contraction dimension gives a partial sum.
    Contracting regions of which some are whole is a partial sum too, once a rank alone
    counts the whole rows (the tensor_parallel pass restricts the others' operands)."""
    nd = len(a_shape)  # 2 for mm, 3 for bmm
    m, k, kb, n = nd - 2, nd - 1, nd - 2, nd - 1
    if a == PARTIAL or b == PARTIAL:
        raise Unshardable("a partial sum reaches a matmul")
    if isinstance(a, Regions) or isinstance(b, Regions):
        if a is None and b.dim == n or b is None and a.dim == m:
            return a if b is None else b
        if isinstance(a, Regions) and isinstance(b, Regions) and a.dim == k and \
                b.dim == kb and (a.sizes, a.whole) == (b.sizes, b.whole):
            return PARTIAL
        raise Unshardable("a matmul of values cut into regions along other dimensions")
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
    if isinstance(sh, Regions):
        out, at = [], 0
        for size in sizes:
            out.append(sliced(sh, dim, at, at + size, None, full_size))
            at += size
        return [local_size(o, size, tp) if o is not None else size
                for o, size in zip(out, sizes)], out
    block = sh.f * sh.s
    if any(size % block for size in sizes):
        raise Unshardable(
            f"split into pieces of {list(sizes)} along a dimension split in blocks of {block}"
            f" (a fused projection? give its module a head count attribute such as 'heads' "
            f"so its parts are split separately)")
    return [size // tp for size in sizes], [normalize(sh, size) for size in sizes]


def cat(shardings, shapes, dim: int):
    split = [s for s in shardings if isinstance(s, (Shard, Regions))]
    if not split:
        return None
    if PARTIAL in shardings:
        raise Unshardable("cat of a partial sum")
    if dim != split[0].dim:
        aligned = {_normal(s, shape[s.dim]) for s, shape in zip(shardings, shapes)}
        if len(split) != len(shardings) or len(aligned) > 1:
            raise Unshardable("cat of tensors split differently (or split and replicated)")
        return split[0]
    if any(s is not None and s.dim != dim for s in shardings):
        raise Unshardable("cat of tensors split along different dimensions")
    blocks = {(s.f, s.s) if s.f * s.s != shape[dim] else (shape[dim], 1)
              for s, shape in zip(shardings, shapes) if isinstance(s, Shard)}
    if len(split) == len(shardings) and len(blocks) == 1 and \
            not any(isinstance(s, Regions) for s in split):
        f, s = blocks.pop()
        return Shard(dim, f, s)
    # unequal pieces, or whole ones beside split ones (a multi-query q|k|v gradient: split
    # q beside whole k and v): each input is one or more regions of the result
    return regions(dim, [p for s, shape in zip(shardings, shapes)
                         for p in pieces_of(s, shape[dim])])


def along(sh, dims, ndim: int):
    """An op that mixes values along ``dims`` (softmax, a mean): a split elsewhere passes."""
    dims = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}
    if sh == PARTIAL:
        raise Unshardable("a partial sum reaches a normalisation")
    if isinstance(sh, (Shard, Regions)) and sh.dim in dims:
        raise Unshardable(f"values are normalised along dimension {sh.dim}, which is split "
                          f"across tensor-parallel ranks")
    return sh


def reduced(sh, dims, ndim: int, keepdim: bool):
    """sum over ``dims``: a split dimension summed away gives a partial sum."""
    if not isinstance(sh, (Shard, Regions)):
        return sh
    dims = {d % ndim for d in dims} if dims else set(range(ndim))
    if sh.dim in dims and isinstance(sh, Regions):
        raise Unshardable("a sum over regions some of which are whole on every rank (or "
                          "grouped)")
    if sh.dim in dims:
        return PARTIAL
    return sh if keepdim else moved(sh, -sum(1 for d in dims if d < sh.dim))


def sliced(sh, dim: int, start, end, step, size: int):
    """slice along ``dim`` (RoPE's rotate_half halves the head dimension): a split elsewhere,
    a partial sum, or a replicated value pass through. A slice of the split dimension itself
    passes when it takes whole blocks (Phi-3's ``qkv[..., :q]`` of a fused q|k|v split per
    part): each rank slices [start/tp, end/tp) of its piece, which holds its share of every
    block. Anything else would need another rank's elements."""
    if not isinstance(sh, (Shard, Regions)) or dim != sh.dim:
        return sh
    bounds = slice_bounds(start, end, step, size)
    if bounds == (0, size):
        return sh
    if isinstance(sh, Regions):  # what the regions are in the slice
        if bounds is None:
            raise Unshardable(f"a strided slice of regions {list(sh.sizes)}")
        return sh.cut(*bounds)
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
    if not isinstance(sh, (Shard, Regions)):
        return sh
    dim %= ndim
    if dim == sh.dim:
        raise Unshardable(f"a select along dimension {dim}, which is split across "
                          f"tensor-parallel ranks")
    return moved(sh, -1) if dim < sh.dim else sh


def stacked(shardings, shapes, dim: int):
    """stack along a new dimension ``dim`` (GPT-J's rotary code): every input split the same
    way (or all replicated); the split moves up past the new dimension."""
    if PARTIAL in shardings or any(isinstance(s, Regions) for s in shardings):
        raise Unshardable("a partial sum (or regions) reaches a stack")
    split = [s for s in shardings if isinstance(s, Shard)]
    if not split:
        return None
    aligned = {normalize(s, shape[s.dim]) for s, shape in zip(shardings, shapes)
               if isinstance(s, Shard)}
    if len(split) != len(shardings) or len(aligned) > 1:
        raise Unshardable("stack of tensors split differently (or split and replicated)")
    sh = aligned.pop()
    return moved(sh, 1) if dim % (len(shapes[0]) + 1) <= sh.dim else sh
