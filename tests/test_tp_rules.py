"""Sharding propagation rules against the meaning of a Shard, computed with plain torch.

``local_of`` is the definition (dimension d read as (outer, f, s); rank r keeps factor
block r): a rule is right when doing the op on the whole tensor and then taking rank r's
piece equals taking the pieces first and doing the op on them with the rule's local shapes.
"""
import pytest
import torch

from zerofx.tp import rules as R


def local_of(full: torch.Tensor, sh: R.Shard, tp: int, rank: int) -> torch.Tensor:
    n = full.shape[sh.dim]
    outer = n // (sh.f * sh.s)
    shape = list(full.shape)
    split = shape[:sh.dim] + [outer, sh.f, sh.s] + shape[sh.dim + 1:]
    per = sh.f // tp
    piece = full.reshape(split).narrow(sh.dim + 1, rank * per, per)
    return piece.reshape(shape[:sh.dim] + [n // tp] + shape[sh.dim + 1:])


RESHAPES = [
    # (full in shape, split of it, full out shape): the GPT attention's views among them
    ((16, 96), R.Shard(1, 32, 1), (2, 8, 96)),  # mm out -> [B, T, 3C], fused q|k|v
    ((2, 8, 32), R.Shard(2, 32, 1), (2, 8, 4, 8)),  # C -> (heads, head_dim)
    ((2, 8, 4, 8), R.Shard(2, 4, 1), (2, 8, 32)),  # heads back into C
    ((2, 8, 4, 8), R.Shard(2, 4, 1), (16, 32)),
    ((2, 4, 8, 8), R.Shard(1, 4, 1), (8, 8, 8)),  # B*H merged
    ((8, 8, 8), R.Shard(0, 4, 1), (2, 4, 8, 8)),  # and split again: H, not B
    ((4, 6), R.Shard(1, 6, 1), (24,)),
    ((24,), R.Shard(0, 6, 1), (4, 6)),
    ((4, 6), R.Shard(1, 6, 1), (8, 3)),  # half rows become alternate rows
    ((1, 128), R.Shard(1, 128, 1), (128,)),
]


@pytest.mark.parametrize("in_shape,sh,out_shape", RESHAPES)
@pytest.mark.parametrize("tp", [2])
def test_reshape_follows_the_split(in_shape, sh, out_shape, tp):
    full = torch.arange(torch.Size(in_shape).numel()).reshape(in_shape)
    out = R.reshape(sh, in_shape, out_shape, tp)
    local_shape = list(out_shape)
    local_shape[out.dim] //= tp
    for rank in range(tp):
        torch.testing.assert_close(local_of(full.reshape(out_shape), out, tp, rank),
                                   local_of(full, sh, tp, rank).reshape(local_shape))


def test_reshape_that_cuts_the_split_is_refused():
    # 6 elements in 3 blocks of 2 cannot become rows of 3: a block straddles two rows
    with pytest.raises(R.Unshardable, match="cuts through"):
        R.reshape(R.Shard(0, 6, 1), (6,), (2, 3), 3)


def test_permute_and_matmul_rules():
    a = torch.randn(6, 8)
    w = torch.randn(4, 8)  # Linear weight [out, in], colwise split on out
    sh_w = R.Shard(0, 4, 1)
    sh_wt = R.permute(sh_w, [1, 0])
    assert sh_wt == R.Shard(1, 4, 1)
    out = R.matmul(None, sh_wt, a.shape, (8, 4))
    for r in range(2):  # mm(x, W_r^T) is rank r's column block of the output
        torch.testing.assert_close(a @ local_of(w, sh_w, 2, r).T,
                                   local_of(a @ w.T, out, 2, r))
    # a contraction over the split dimension is a partial sum: the pieces sum to the whole
    x = torch.randn(6, 8)
    w2 = torch.randn(5, 8)
    assert R.matmul(R.Shard(1, 8, 1), R.Shard(0, 8, 1), (6, 8), (8, 5)) == R.PARTIAL
    pieces = [local_of(x, R.Shard(1, 8, 1), 2, r) @ local_of(w2.T, R.Shard(0, 8, 1), 2, r)
              for r in range(2)]
    torch.testing.assert_close(pieces[0] + pieces[1], x @ w2.T)
    with pytest.raises(R.Unshardable):
        R.matmul(R.Shard(1, 8, 1), None, (6, 8), (8, 5))


def test_split_and_cat_of_a_fused_projection():
    qkv = torch.arange(2 * 12).reshape(2, 12)  # [B, 3C], C = 4, split per part
    sh = R.Shard(1, 4, 1)
    sizes, pieces = R.split_pieces(sh, 1, [4, 4, 4], 12, 2)
    assert sizes == [2, 2, 2] and pieces == [R.Shard(1, 4, 1)] * 3
    for r in range(2):
        local = local_of(qkv, sh, 2, r).split(sizes, dim=1)
        for whole, piece, psh in zip(qkv.split(4, dim=1), local, pieces):
            torch.testing.assert_close(local_of(whole, psh, 2, r), piece)
    assert R.cat(pieces, [(2, 4)] * 3, 1) == sh
    with pytest.raises(R.Unshardable, match="head count"):
        R.split_pieces(R.Shard(1, 12, 1), 1, [4, 4, 4], 12, 2)  # split as one block


def test_pointwise_broadcast_and_reductions():
    sh = R.Shard(1, 8, 1)
    assert R.pointwise([(sh, (4, 8)), (R.Shard(0, 8, 1), (8,))], (4, 8)) == sh  # bias add
    assert R.pointwise([(sh, (4, 8)), (None, (4, 1))], (4, 8)) == sh  # broadcast along split
    with pytest.raises(R.Unshardable, match="replicated input"):
        R.pointwise([(sh, (4, 8)), (None, (4, 8))], (4, 8))
    assert R.reduced(sh, [0], 2, True) == sh
    assert R.reduced(sh, [0], 2, False) == R.Shard(0, 8, 1)
    assert R.reduced(sh, [1], 2, False) == R.PARTIAL


def test_slices_pass_a_split_elsewhere_and_refuse_cutting_it():
    heads = R.Shard(1, 8, 1)  # [B, H, T, hd] split over H
    # rotate_half: x[..., :hd/2] and x[..., hd/2:] along the unsplit head dimension
    assert R.sliced(heads, 3, 0, 8, 1, 16) == heads
    assert R.sliced(heads, 3, 8, 2**63 - 1, 1, 16) == heads
    assert R.sliced(None, 3, 0, 8, 1, 16) is None
    assert R.sliced(R.PARTIAL, 0, 0, 1, 1, 4) == R.PARTIAL
    assert R.sliced(heads, 1, 0, 2**63 - 1, 1, 8) == heads  # the whole split dimension
    with pytest.raises(R.Unshardable, match="dimension 1, which is split"):
        R.sliced(heads, 1, 0, 4, 1, 8)


def test_every_op_set_the_pass_names_has_a_rule():
    # the rule table (tp/propagation.RULES) covers the op families the module declares;
    # a log-softmax tries the vocabulary rule before the plain softmax one
    import zerofx.tp.propagation as P

    for family in (P.VIEWS, P.SOFTMAX, P.VOCAB_PARALLEL, P.HEAD_PARALLEL):
        assert all(op in P.RULES for op in family)
    names = [fn.__name__ for fn in P.RULES[torch.ops.aten._log_softmax.default]]
    assert names == ["_vocab_parallel", "_softmax"]
