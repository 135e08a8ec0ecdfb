"""Tensor parallelism through fused and reshaped attention: slices, selects, stacks and
batched-head matmuls of split values, and Hugging Face architectures that use them.

Rules: each against plain torch (a rule is right when doing the op on the whole tensor and
taking rank r's piece equals doing it on the pieces). Discovery: hand-built modules whose
fused q|k|v is cut by slices, split per part where the cuts allow and kept whole (with the
reason) where they do not. Models: Phi-3 (fused qkv_proj cut by slices, fused gate_up_proj),
Bloom (query_key_value viewed to [.., heads, 3, hd] and selected, alibi), Falcon (as Bloom;
grouped key/value heads), GPT-J (rotary embedding through stack) and DistilBERT's masked LM
on real gloo ranks against one process: losses and final weights, every attention and MLP
projection split, and the saved 16-bit model (and the consolidated checkpoint) loading strict
into the unsplit model. Multi-query Llama: query heads split, key/value whole, their
gradients summed over the ranks. What no split fits stays whole, with the reason (grouped
and multi-query fused q|k|v: test_tp_grouped.py).
"""
import pytest
import torch
from torch import nn

from multiproc import run_ranks
from test_tp_rules import local_of
from zerofx.tp import rules as R

LR = 1e-2


# ---- rules against plain torch ----------------------------------------------------------

def _pieces(full, sh, tp=2):
    return [local_of(full, sh, tp, r) for r in range(tp)]


@pytest.mark.parametrize("sh,start,end", [
    (R.Shard(1, 8, 1), 0, 8),  # q of a fused [q|k|v] split per part
    (R.Shard(1, 8, 1), 8, 16),  # k
    (R.Shard(1, 8, 1), 16, None),  # v, to the end
    (R.Shard(1, 8, 1), -8, None),  # v, from the end
    (R.Shard(1, 8, 1), 8, 24),  # k and v together: still two blocks
    (R.Shard(1, 4, 2), 8, 16),  # blocks of a head dimension below the factor
])
def test_a_slice_of_whole_blocks_takes_each_ranks_share(sh, start, end):
    full = torch.randn(3, 24)
    out = R.sliced(sh, 1, start, end, None, 24)
    lo, hi = R.slice_bounds(start, end, None, 24)
    for rank, piece in enumerate(_pieces(full, sh)):
        torch.testing.assert_close(piece[:, lo // 2:hi // 2],
                                   local_of(full[:, start:end], out, 2, rank))


@pytest.mark.parametrize("start,end,step", [(0, 4, None), (4, 12, None), (0, 24, 2)])
def test_a_slice_cutting_a_block_or_strided_is_refused(start, end, step):
    with pytest.raises(R.Unshardable, match="slice"):
        R.sliced(R.Shard(1, 8, 1), 1, start, end, step, 24)


def test_select_and_unbind_move_the_split_past_the_removed_dimension():
    full = torch.randn(2, 3, 4, 3, 5)  # Bloom: [B, T, heads, 3, hd], heads split
    sh = R.Shard(2, 4, 1)
    for dim in (0, 3, 4, -1):
        out = R.selected(sh, dim, 5)
        for rank, piece in enumerate(_pieces(full, sh)):
            torch.testing.assert_close(piece.select(dim, 1),
                                       local_of(full.select(dim, 1), out, 2, rank))
    with pytest.raises(R.Unshardable, match="select along dimension 2"):
        R.selected(sh, 2, 5)


@pytest.mark.parametrize("dim", [0, 2, 3, -1])
def test_stack_of_equally_split_values(dim):
    a, b = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)  # GPT-J: [B, T, heads, hd]
    sh = R.Shard(2, 4, 1)
    out = R.stacked([sh, sh], [a.shape, b.shape], dim)
    for rank, (pa, pb) in enumerate(zip(_pieces(a, sh), _pieces(b, sh))):
        torch.testing.assert_close(torch.stack([pa, pb], dim),
                                   local_of(torch.stack([a, b], dim), out, 2, rank))
    with pytest.raises(R.Unshardable, match="stack"):
        R.stacked([sh, None], [a.shape, b.shape], dim)


# ---- op rules on traced graphs (propagation.infer), against plain torch ---------------

def _traced(fn, *args):
    """fn's aten graph (forward and backward as autograd records them)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn)(*args)
    return gm, [n for n in gm.graph.nodes if n.op == "placeholder"]


def _infer_all(gm, state):
    from zerofx.tp import propagation as P

    full = {n: P.shapes(n.meta.get("val")) for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(state.get(a) is not None
                                              for a in node.all_input_nodes):
            state[node] = P.infer(node, state, full, 2)
    return state


def test_index_and_its_backward_index_put_keep_the_split():
    # Falcon's new decoder: [B, T, kv groups (split), group + 2, hd], key = x[..., [-2], :]
    def fn(x, g):
        y = x[:, :, :, [-2]]
        return y, torch.autograd.grad(y, x, g)[0]

    x, g = torch.randn(2, 3, 4, 5, 6, requires_grad=True), torch.randn(2, 3, 4, 1, 6)
    gm, (px, pg) = _traced(fn, x, g)
    sh = R.Shard(2, 4, 1)
    state = _infer_all(gm, {px: sh, pg: sh})
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert state[out[0]] == sh and state[out[1]] == sh
    y, dx = fn(x, g)
    for rank, (xr, gr) in enumerate(zip(_pieces(x.detach(), sh), _pieces(g, sh))):
        yr, dxr = fn(xr.requires_grad_(), gr)
        torch.testing.assert_close(yr, local_of(y.detach(), sh, 2, rank))
        torch.testing.assert_close(dxr, local_of(dx, sh, 2, rank))
    with pytest.raises(R.Unshardable, match="index along dimension 3"):
        _infer_all(gm, {px: R.Shard(3, 5, 1), pg: None})  # the indexed dimension is split


def test_squeeze_and_its_unsqueeze_keep_the_split():
    # repeat_kv (transformers >= 5.25): x[:, :, None].expand(...), whose backward sums the
    # repeats and squeezes the size-1 dimension away again: [B, kv heads (split), T, hd]
    def fn(x, g):
        y = x[:, :, None].expand(2, 4, 3, 5, 6).reshape(2, 12, 5, 6)
        return y, torch.autograd.grad(y, x, g)[0]

    x, g = torch.randn(2, 4, 5, 6, requires_grad=True), torch.randn(2, 12, 5, 6)
    gm, (px, pg) = _traced(fn, x, g)
    assert any(n.target in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)
               for n in gm.graph.nodes), gm.graph
    sh, gsh = R.Shard(1, 4, 1), R.Shard(1, 12, 1)
    state = _infer_all(gm, {px: sh, pg: gsh})
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert state[out[0]] == gsh and state[out[1]] == sh
    y, dx = fn(x, g)
    for rank, (xr, gr) in enumerate(zip(_pieces(x.detach(), sh), _pieces(g, gsh))):
        def local(x, g):  # the same code at the local head count
            yl = x[:, :, None].expand(2, 2, 3, 5, 6).reshape(2, 6, 5, 6)
            return yl, torch.autograd.grad(yl, x, g)[0]
        yr, dxr = local(xr.requires_grad_(), gr)
        torch.testing.assert_close(yr, local_of(y.detach(), gsh, 2, rank))
        torch.testing.assert_close(dxr, local_of(dx, sh, 2, rank))


def test_baddbmm_takes_the_bias_of_its_heads():
    # Bloom: alibi [B*H, 1, T] + q @ k^T over a batch of heads split within each sample
    def fn(bias, q, k):
        return torch.baddbmm(bias, q, k, beta=1.0, alpha=0.5)

    bias, q, k = torch.randn(8, 1, 5), torch.randn(8, 5, 3), torch.randn(8, 3, 5)
    gm, (pb, pq, pk) = _traced(fn, bias, q, k)
    sh = R.Shard(0, 4, 1)  # [B=2 x H=4]: each rank's 2 heads of every sample
    state = _infer_all(gm, {pq: sh, pk: sh})
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert state[node] == sh
    for rank in range(2):
        want = local_of(fn(bias, q, k), sh, 2, rank)
        got = fn(local_of(bias, sh, 2, rank), local_of(q, sh, 2, rank),
                 local_of(k, sh, 2, rank))  # the pass slices the whole bias to its heads
        torch.testing.assert_close(got, want)
    with pytest.raises(R.Unshardable, match="partial sum"):
        _infer_all(gm, {pq: R.Shard(2, 3, 1), pk: R.Shard(1, 3, 1)})


def test_a_one_head_key_values_gradient_is_a_partial_sum():
    # multi-query: 4 query heads split, one key/value head whole on every rank
    def fn(q, k, v, g):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return torch.autograd.grad(out, (q, k, v), g)

    q = torch.randn(2, 4, 5, 8, requires_grad=True)
    k, v = (torch.randn(2, 1, 5, 8, requires_grad=True) for _ in range(2))
    g = torch.randn(2, 4, 5, 8)
    gm, (pq, pk, pv, pg) = _traced(fn, q, k, v, g)
    sh = R.Shard(1, 4, 1)
    state = _infer_all(gm, {pq: sh, pg: sh})
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert [state.get(o) for o in out] == [sh, R.PARTIAL, R.PARTIAL]
    dq, dk, dv = fn(q, k, v, g)
    parts = [fn(local_of(q.detach(), sh, 2, r).requires_grad_(), k, v, local_of(g, sh, 2, r))
             for r in range(2)]
    torch.testing.assert_close(sum(p[1] for p in parts), dk)  # summed over the ranks
    torch.testing.assert_close(sum(p[2] for p in parts), dv)
    for r, p in enumerate(parts):
        torch.testing.assert_close(p[0], local_of(dq, sh, 2, r))


# ---- the pass's rules on traced graphs --------------------------------------------------

class FusedAttention(nn.Module):
    """Phi-3's attention in miniature: one qkv Linear cut by slices into q, k and v."""

    def __init__(self, d=16, heads=4, kv_heads=4):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv_heads, d // heads
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(x)
        q_end, k_end = self.heads * self.hd, (self.heads + self.kv) * self.hd
        q, k, v = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
        q, k, v = (z.view(b, t, -1, self.hd).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       enable_gqa=self.kv != self.heads)
        return self.o(y.transpose(1, 2).reshape(b, t, -1)).pow(2).mean()


class SelectAttention(nn.Module):
    """Bloom's: qkv viewed as [B, T, heads, 3, hd] (heads outermost), q, k, v selected."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.heads, 3, self.hd)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1)).pow(2).mean()


class IndexMultiQuery(nn.Module):
    """Falcon's multi-query attention as transformers < 5.25 writes it: qkv viewed as
    [B, T, heads + 2, hd], the queries sliced, the one key and value head indexed by a
    constant list (aten.index.Tensor), the key broadcast to every query head."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv = nn.Linear(d, (heads + 2) * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.heads + 2, self.hd)
        q, k, v = qkv[..., :-2, :], qkv[..., [-2], :], qkv[..., [-1], :]
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2) / self.hd ** 0.5).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o(y).pow(2).mean()


def _discover(model, tp=2):
    from zerofx.tp import discovery as D

    gm, names = D.trace_forward(model, (torch.randn(2, 5, 16),))
    whole = {}
    found = D.discover(gm, D.find_weights(gm, names), tp, whole=whole)
    return {f.name: (f.style, f.parts) for f in found}, whole


def test_slices_of_a_fused_qkv_split_it_per_part():
    found, whole = _discover(FusedAttention())
    assert found == {"qkv.weight": ("colwise", 3), "o.weight": ("rowwise", 1)}
    assert not whole


def test_grouped_slices_of_a_fused_qkv_split_it_region_by_region():
    # q 4 heads, k and v 2 each: equal parts would pair query heads 0 and 2 with key/value
    # head 0; the regions q | k | v split on their own give each rank its query heads
    # beside the key/value heads they read (test_tp_grouped.py has the rest)
    from zerofx.tp import discovery as D

    gm, names = D.trace_forward(FusedAttention(kv_heads=2), (torch.randn(2, 5, 16),))
    found = {f.name: f for f in D.discover(gm, D.find_weights(gm, names), 2)}
    assert found["qkv.weight"].regions == ((16, False), (8, False), (8, False))
    assert found["o.weight"].style == "rowwise"


def test_an_indexed_multi_query_head_splits_the_queries_and_keeps_key_value_whole():
    # the constant index cuts qkv like a slice: the query rows split, the key and value
    # rows whole on every rank (as transformers 5.25's split([H, 1, 1]) gives)
    from zerofx.tp import discovery as D

    gm, names = D.trace_forward(IndexMultiQuery(), (torch.randn(2, 5, 16),))
    whole = {}
    found = {f.name: f for f in D.discover(gm, D.find_weights(gm, names), 2, whole=whole)}
    assert not whole, whole
    (q, q_whole), *kv = found["qkv.weight"].regions
    assert (q, q_whole) == (16, False) and sum(n for n, _ in kv) == 8 and \
        all(w is True for _, w in kv), found["qkv.weight"].regions
    assert found["o.weight"].style == "rowwise"


def _index_mq_body(rank, world, steps):
    import zerofx

    torch.manual_seed(0)
    engine, *_ = zerofx.initialize(model=IndexMultiQuery(), config=_cfg(2, 1),
                                   example_inputs=(torch.randn(2, 5, 16),))
    losses = []
    for k in range(steps):
        loss = engine(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(k)))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    rt = engine.runtime
    return (losses, {s.name: rt.local_param(s.name).float().clone() for s in rt.plan.params},
            {s.name: s.tp for s in rt.plan.params})


@pytest.mark.slow
def test_an_indexed_multi_query_head_trains_at_tp2_like_one_process():
    """The index becomes a slice of each rank's piece and the math kernel's bmm of split
    query heads against the whole key takes the rank's batches: training equals eager
    AdamW with clipping in one process, and qkv is split."""
    steps = 4
    results = run_ranks(_index_mq_body, 2, args=(steps,), timeout_s=240)
    torch.manual_seed(0)
    ref = IndexMultiQuery()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01)
    want = []
    for k in range(steps):
        loss = ref(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(k)))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        want.append(loss.item())
    for rank, (losses, pieces, shards) in enumerate(results):
        assert shards["qkv.weight"] is not None and shards["o.weight"] is not None
        torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
        for n, p in ref.named_parameters():
            torch.testing.assert_close(pieces[n], shards[n].local_piece(p.detach(), 2, rank),
                                       rtol=1e-5, atol=1e-6, msg=n)


def test_an_index_of_a_split_region_or_of_scattered_positions_is_refused():
    from zerofx.tp.propagation_cuts import index_as_slice

    def fn(x):
        return x[:, [0, 1]], x[:, [4, 6]]

    gm, (px,) = _traced(fn, torch.randn(3, 8))
    from zerofx.tp import propagation as P

    full = {n: P.shapes(n.meta.get("val")) for n in gm.graph.nodes}
    regions = R.Regions(1, (4, 2, 2), (False, True, True))  # 4 split, 2 and 2 whole
    split_part, scattered = [n for n in gm.graph.nodes
                             if n.target == torch.ops.aten.index.Tensor]
    with pytest.raises(R.Unshardable, match="region split across"):
        index_as_slice(split_part, regions, full)
    with pytest.raises(R.Unshardable, match="consecutive"):
        index_as_slice(scattered, regions, full)


def test_a_sequential_with_dropout_in_training_is_read_from_its_graph():
    # nn.Sequential names its parameters "0.weight"; a forward without grad records dropout
    # as empty_like, bernoulli_, div_ (AOTAutograd's graphs hold native_dropout)
    from zerofx.tp import discovery as D

    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 8)).train()
    gm, names = D.trace_forward(mlp, (torch.randn(2, 8),))
    found = {f.name: f.style for f in D.discover(gm, D.find_weights(gm, names), 2)}
    assert found == {"0.weight": "colwise", "3.weight": "rowwise"}


def test_selects_of_a_head_major_qkv_split_it_plainly():
    found, whole = _discover(SelectAttention())
    assert found == {"qkv.weight": ("colwise", 1), "o.weight": ("rowwise", 1)}


# ---- Hugging Face architectures on real ranks -------------------------------------------

# Each model's projections (every 2-D weight of its attention and MLP modules) and, as
# Megatron splits them, their style and parts in the first layer.
_PREFIX = {"phi3": "model.layers.", "bloom": "transformer.h.", "falcon": "transformer.h.",
           "falcon_gqa": "transformer.h.", "gptj": "transformer.h.",
           "distilbert_mlm": "distilbert.transformer.layer."}
FIRST_LAYER = {
    "phi3": {"self_attn.qkv_proj": ("colwise", 3), "self_attn.o_proj": ("rowwise", 1),
             "mlp.gate_up_proj": ("colwise", 2), "mlp.down_proj": ("rowwise", 1)},
    "bloom": {"self_attention.query_key_value": ("colwise", 1),  # head-major: plain rows
              "self_attention.dense": ("rowwise", 1), "mlp.dense_h_to_4h": ("colwise", 1),
              "mlp.dense_4h_to_h": ("rowwise", 1)},
    "gptj": {"attn.q_proj": ("colwise", 1), "attn.k_proj": ("colwise", 1),
             "attn.v_proj": ("colwise", 1), "attn.out_proj": ("rowwise", 1),
             "mlp.fc_in": ("colwise", 1), "mlp.fc_out": ("rowwise", 1)},
    "distilbert_mlm": {"attention.q_lin": ("colwise", 1), "attention.k_lin": ("colwise", 1),
                       "attention.v_lin": ("colwise", 1), "attention.out_lin": ("rowwise", 1),
                       "ffn.lin1": ("colwise", 1), "ffn.lin2": ("rowwise", 1)},
}
FIRST_LAYER["falcon"] = FIRST_LAYER["falcon_gqa"] = FIRST_LAYER["bloom"]


def _cfg(tp, stage):
    zero = {"stage": stage, "reduce_bucket_size": 2000}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
            "tensor_parallel": {"size": tp}, "gradient_clipping": 1.0,
            "train_micro_batch_size_per_gpu": 2, "zero_optimization": zero}


def _body(rank, world, name, tp, stage, steps, out_dir):
    import zerofx
    from hf_models import make_hf, train_on_hf_batches

    engine, *_ = zerofx.initialize(model=make_hf(name), config=_cfg(tp, stage))
    rt = engine.runtime
    losses, _ = train_on_hf_batches(engine, name, steps, rt.plan.grid.dp_rank(rank))
    engine.save_16bit_model(out_dir)
    engine.save_checkpoint(f"{out_dir}/ckpt", tag="t")
    with rt.gathered_parameters():
        pieces = {s.name: rt.local_param(s.name).float().clone() for s in rt.plan.params}
    styles = {c.module: (c.style, c.parts) for c in rt.plan.tp_choices}
    return losses, pieces, {s.name: s.tp for s in rt.plan.params}, styles


def _projections(model, name):
    """Names of the 2-D weights of every attention and MLP module of the model's layers."""
    return {n for n, p in model.named_parameters()
            if n.startswith(_PREFIX[name]) and p.dim() == 2}


def _check_run(name, tp, stage, steps, out_dir, results, whole=frozenset(), rel_tol=2e-5):
    from hf_models import make_hf, one_process_reference

    model, want, _ = one_process_reference(name, steps, len(results) // tp, LR)
    projections = _projections(model, name)
    for rank, (losses, pieces, shards, styles) in enumerate(results):
        torch.testing.assert_close(losses, want[rank // tp], rtol=1e-5, atol=1e-5)
        left = {n for n in projections if shards[n] is None}
        assert left == set(whole), f"left whole: {sorted(left)}"
        first = {m[len(_PREFIX[name]) + 2:]: s for m, s in styles.items()
                 if m.startswith(_PREFIX[name] + "0.")}
        assert name not in FIRST_LAYER or first == FIRST_LAYER[name], first
        got, ref = [], []
        for n, p in model.named_parameters():
            got.append(pieces[n].reshape(-1))
            ref.append((p.detach() if shards[n] is None else
                        shards[n].local_piece(p.detach(), tp, rank % tp)).reshape(-1))
        got, ref = torch.cat(got), torch.cat(ref)
        rel = float((got - ref).norm() / ref.norm())
        # 2e-5, as for Llama in test_tensor_parallel: the vocabulary-parallel cross-entropy
        # sums in another order, rounding that Adam scales up on near-zero gradients
        assert rel <= rel_tol, f"rank {rank}: final weights differ by {rel:.2e}"
    # the saved 16-bit model loads strict into the unsplit model, and holds exactly the
    # weights the ranks trained: splitting it again gives every rank's pieces
    saved = make_hf(name)
    saved.load_state_dict(torch.load(f"{out_dir}/pytorch_model.bin"))
    for rank, (_, pieces, shards, _) in enumerate(results):
        for n, p in saved.named_parameters():
            mine = p.detach() if shards[n] is None else \
                shards[n].local_piece(p.detach(), tp, rank % tp)
            torch.testing.assert_close(mine, pieces[n], rtol=0, atol=0, msg=n)
    # and the checkpoint, consolidated (zerofx-consolidate), holds the same whole weights
    from zerofx.tools.consolidate import consolidate

    state = consolidate(f"{out_dir}/ckpt", f"{out_dir}/whole.pt", echo=lambda _: None)
    consolidated = make_hf(name)
    missing, unexpected = consolidated.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {n for n, _ in consolidated.named_buffers()}
    for (n, p), (_, q) in zip(consolidated.named_parameters(), saved.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["phi3", "bloom", "falcon", "falcon_gqa", "gptj",
                                  "distilbert_mlm"])
def test_tp2_zero1_trains_like_one_process_with_every_projection_split(name, tmp_path):
    pytest.importorskip("transformers")
    steps = 3
    results = run_ranks(_body, 2, args=(name, 2, 1, steps, str(tmp_path)), timeout_s=240)
    _check_run(name, 2, 1, steps, tmp_path, results)


@pytest.mark.slow
def test_tp4_phi3_one_head_per_rank_trains_like_one_process(tmp_path):
    pytest.importorskip("transformers")
    results = run_ranks(_body, 4, args=("phi3", 4, 1, 2, str(tmp_path)), timeout_s=300)
    _check_run("phi3", 4, 1, 2, tmp_path, results)


@pytest.mark.slow
# Each architecture once (Bloom at ZeRO-3; its ZeRO-2 case repeated the layout at 8 s).
@pytest.mark.parametrize("name,stage", [("bloom", 3), ("distilbert_mlm", 3), ("phi3", 2),
                                        ("falcon", 2), ("gptj", 2)])
def test_tp2_dp2_zero2_zero3_trains_like_one_process(name, stage, tmp_path):
    """ZeRO-2 partitions each data-parallel group's gradients and optimizer state of the
    pieces, ZeRO-3 the pieces too (the 16-bit model is gathered); 2 steps."""
    pytest.importorskip("transformers")
    results = run_ranks(_body, 4, args=(name, 2, stage, 2, str(tmp_path)), timeout_s=400)
    _check_run(name, 2, stage, 2, tmp_path, results, rel_tol=DP2_REL_TOL.get(name, 2e-5))


# Phi-3 at TP 2 x DP 2 ends 4.2e-5 from one process, at ZeRO-1 and ZeRO-2 alike (bit for bit
# the same weights): one element each of layer 0's down_proj and layer 1's o_proj, where
# the first step's gradient is 3e-6 and 1.7e-8 (median 7e-4 and 7e-3; Adam's eps 1e-8), so
# Adam turns rounding of the data-parallel mean into 4e-4 and 2.5e-4 of weight. The next
# element off by most: 1.4e-5; the losses still agree to 1e-5 (checked first).
DP2_REL_TOL = {"phi3": 5e-5}


@pytest.mark.slow
def test_multi_query_keeps_key_value_whole_and_sums_their_gradients(tmp_path):
    """One key/value head for 4 query heads at TP 2: the query heads split, k_proj and
    v_proj whole on every rank. Their gradients come out of attention's backward summed
    over this rank's query heads only: all-reduced, they equal one process's (without the
    sum the losses part from the second step on)."""
    pytest.importorskip("transformers")
    _PREFIX["llama_mq"] = "model.layers."
    results = run_ranks(_body, 2, args=("llama_mq", 2, 1, 3, str(tmp_path)), timeout_s=240)
    kv = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "kv"}
    _check_run("llama_mq", 2, 1, 3, tmp_path, results, whole=kv)
    assert all(styles["model.layers.0.self_attn.q_proj"] == ("colwise", 1)
               for *_, styles in results)


def _left_whole(name, tp=2):
    import zerofx
    from hf_models import hf_batch, make_hf
    from zerofx.tp.layout import resolve_tp_layout

    cfg = zerofx.Config.from_dict({"tensor_parallel": {"size": tp}})
    return dict(resolve_tp_layout(make_hf(name), cfg, hf_batch(name, 0)).left_whole)


def test_what_no_split_fits_is_kept_whole_with_the_reason():
    """DistilBERT's vocab_transform feeds a LayerNorm over its features: whole, as
    Megatron's BERT LM head keeps its dense. (Grouped and multi-query fused projections
    are split: test_tp_grouped.py; Phi-3 with 2 key/value heads at TP 4 too, each
    key/value head held by the 2 ranks whose query heads read it: test_tp_gqa_groups.py.)"""
    pytest.importorskip("transformers")
    assert "layer_norm" in _left_whole("distilbert_mlm")["vocab_transform.weight"]
    assert not _left_whole("falcon_mq") and not _left_whole("phi3_gqa")
    assert not _left_whole("phi3_gqa", tp=4)
