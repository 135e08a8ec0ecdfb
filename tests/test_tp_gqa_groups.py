"""Tensor parallelism with fewer key/value heads than ranks: each key/value head replicated
over the group of ranks whose query heads read it.

With H query heads, KV key/value heads and tp ranks (KV < tp, tp % KV == 0), rank r holds
query heads [r·H/tp, (r+1)·H/tp) and key/value head r·KV // tp, the one those query heads
read (tp/rules.py Regions with a group count). Attention's backward gives each rank its own
query heads' share of its head's gradient: the tensor_parallel pass sums it over the group
(an all-reduce over the TP group of the gradient placed at its head among zeros); the
input gradient then counts each group once, gradient clipping counts each distinct row once,
and saved files hold the unsplit weight. Layout against plain torch; discovery on Phi-3's
fused qkv_proj and Llama's separate k_proj/v_proj with 2 key/value heads at TP 4 (every
projection split) and 1 (k/v whole on every rank: the group is all ranks); training on 4
gloo ranks against one process; a control without the group sum. Also the issue's other
architectures at TP 4: their layouts, and Bloom, GPT-J, DistilBERT (ZeRO-2) and Falcon
(ZeRO-3) trained.
"""
import pytest
import torch

from multiproc import run_ranks
from test_tp_fused import _PREFIX, _body, _check_run
from zerofx.tp import rules as R
from zerofx.tp.layout import TPShard

# Llama with separate q/k/v and 4 query heads: "llama" has 2 key/value heads, "llama_mq" 1
_PREFIX.update({"phi3_gqa": "model.layers.", "llama": "model.layers.",
                "llama_mq": "model.layers."})


# ---- the layout against plain torch -----------------------------------------------------

def test_a_grouped_region_gives_each_rank_the_head_its_query_heads_read():
    w = torch.randn(64, 3)  # Phi-3-like [q: 4 heads | k: 2 | v: 2] of head size 8
    shard = TPShard(0, 3, (64, 3), ((32, False), (16, 2), (16, 2)))
    pieces = [shard.local_piece(w, 4, r) for r in range(4)]
    for r, piece in enumerate(pieces):  # query head r, key and value head r // 2
        kv = r // 2
        torch.testing.assert_close(piece, torch.cat([w[8 * r:8 * r + 8],
                                                     w[32 + 8 * kv:40 + 8 * kv],
                                                     w[48 + 8 * kv:56 + 8 * kv]]))
    assert shard.local_shape(4) == (24, 3)
    torch.testing.assert_close(shard.whole(pieces), w)
    from zerofx.checkpoint.files import join_tp_pieces

    torch.testing.assert_close(join_tp_pieces(pieces, 0, 3, [[32, False], [16, 2], [16, 2]]), w)
    # norms: each listing counts 1/tp, so k and v rows (held by 2 of 4 ranks) are listed
    # twice: summed over the 4 ranks every distinct row counts once
    spans = shard.replicated_spans(4)
    assert spans == [(8 * 3, 24 * 3), (8 * 3, 24 * 3)]
    total = 0.0
    for p in pieces:  # the rest of a piece counts once per rank, as split rows do
        sq = p.reshape(-1).square()
        listed = torch.zeros_like(sq, dtype=torch.bool)
        for a, b in spans:
            listed[a:b] = True
            total += float(sq[a:b].sum()) / 4
        total += float(sq[~listed].sum())
    assert total == pytest.approx(float(w.square().sum()), rel=1e-5)


def test_grouped_regions_never_merge_and_one_group_is_whole():
    assert R.regions(0, [(16, 2), (16, 2)]) == R.Regions(0, (16, 16), (2, 2))
    assert R.regions(0, [(16, True), (16, 1)]) is None  # one group: whole on every rank
    sh = R.Regions(2, (16,), (2,))
    assert R.reshape(sh, (2, 8, 16), (2, 8, 2, 8), 4) == R.Regions(2, (2,), (2,))
    with pytest.raises(R.Unshardable):  # 4 groups of 2 heads: half a head per group
        R.reshape(R.Regions(2, (16,), (4,)), (2, 8, 16), (2, 8, 2, 8), 8)


# ---- discovery on Hugging Face models --------------------------------------------------

def _layout(name, tp=4):
    import zerofx
    from hf_models import hf_batch, make_hf
    from zerofx.tp.layout import resolve_tp_layout

    model = make_hf(name)
    cfg = zerofx.Config.from_dict({"tensor_parallel": {"size": tp}})
    return model, resolve_tp_layout(model, cfg, hf_batch(name, 0))


@pytest.mark.parametrize("name,kv", [("phi3_gqa", ((32, False), (16, 2), (16, 2))),
                                     ("llama", ((16, 2),))])
def test_two_key_value_heads_at_tp4_split_every_projection(name, kv):
    pytest.importorskip("transformers")
    model, layout = _layout(name)
    assert not layout.left_whole, layout.left_whole
    params = {n for n, p in model.named_parameters() if n.startswith("model.layers.") and
              p.dim() == 2}
    assert params <= set(layout.shards)
    k = "model.layers.1.self_attn." + ("qkv_proj" if name == "phi3_gqa" else "k_proj")
    assert layout.shards[k + ".weight"].regions == kv


def test_one_key_value_head_at_tp4_is_whole_on_every_rank_with_the_reason():
    """One head read by every rank's query heads: its group is all 4 ranks."""
    pytest.importorskip("transformers")
    _, layout = _layout("llama_mq")
    whole = dict(layout.left_whole)
    assert set(whole) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1)
                          for p in "kv"}
    assert "one key/value head" in whole["model.layers.0.self_attn.k_proj.weight"]


# What each of issue 28's architectures keeps whole at TP 4 (the rest of their attention
# and MLP projections split): DistilBERT's vocab_transform feeds a LayerNorm (Megatron keeps
# it too); a one-head key/value is whole on every rank (its group is all ranks); Falcon's
# new decoder with 2 key/value groups over 4 ranks (each rank half a group's query heads
# beside the group's k and v in one kv-major view) is not done: whole, with the reason.
TP4_WHOLE = {"phi3": set(), "phi3_gqa": set(), "bloom": set(), "falcon": set(),
             "falcon_mq": set(), "gptj": set(), "llama": set(),
             "distilbert_mlm": {"vocab_transform"}, "llama_mq": {"k_proj", "v_proj"},
             "falcon_gqa": {"query_key_value", "dense"}}


@pytest.mark.parametrize("name", sorted(TP4_WHOLE))
def test_tp4_layouts_of_the_issues_architectures(name):
    pytest.importorskip("transformers")
    _, layout = _layout(name)
    whole = {n.split(".")[-2]: why for n, why in layout.left_whole}
    assert set(whole) == TP4_WHOLE[name], whole
    assert all(why for why in whole.values())


# ---- training on 4 ranks against one process -------------------------------------------

def _whole_kv(name):
    return {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "kv"} \
        if name == "llama_mq" else set()


@pytest.mark.slow
# One case per architecture (Phi-3's grouped heads at ZeRO-3 only: its ZeRO-1 case repeated
# the layout at 8 s), every ZeRO stage among them.
@pytest.mark.parametrize("name,stage", [("llama", 2), ("llama_mq", 1), ("phi3_gqa", 3),
                                        ("bloom", 2), ("gptj", 2), ("falcon", 3),
                                        ("distilbert_mlm", 2)])
def test_tp4_trains_like_one_process(name, stage, tmp_path):
    """fp32, 3 steps (2 at ZeRO-3), clipping at 1.0: losses and final weights equal one
    process; every projection split (Llama with 1 key/value head: k/v whole); the 16-bit
    model and the consolidated checkpoint load strict into the unsplit model. (Bloom,
    GPT-J, Falcon and DistilBERT, 4 heads each: no grouped heads, the rest of issue 28's
    list at TP 4, one head per rank.)"""
    pytest.importorskip("transformers")
    steps = 2 if stage == 3 else 3
    results = run_ranks(_body, 4, args=(name, 4, stage, steps, str(tmp_path)), timeout_s=400)
    _check_run(name, 4, stage, steps, tmp_path, results, whole=_whole_kv(name))


def _body_grad_norm(rank, world, name, tp, stage, steps, out_dir):
    """_body's first step only, returning the global gradient norm the engine computed."""
    import zerofx
    from hf_models import hf_batch, make_hf
    from test_tp_fused import _cfg

    engine, *_ = zerofx.initialize(model=make_hf(name), config=_cfg(tp, stage))
    out = engine(**hf_batch(name, 0))
    engine.backward(out.loss)
    engine.step()
    return engine.get_global_grad_norm()


@pytest.mark.slow
def test_clipping_counts_each_replicated_head_once(tmp_path):
    """The norm clipping uses equals one process's: the key/value rows 2 of 4 ranks hold
    count once, not twice."""
    pytest.importorskip("transformers")
    from hf_models import hf_batch, make_hf

    model = make_hf("phi3_gqa")
    model(**hf_batch("phi3_gqa", 0)).loss.backward()
    want = float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
    norms = run_ranks(_body_grad_norm, 4, args=("phi3_gqa", 4, 1, 1, str(tmp_path)),
                      timeout_s=300)
    assert norms == pytest.approx([want] * 4, rel=1e-5)


def _body_without_group_sum(rank, world, name, tp, stage, steps, out_dir):
    """_body with the key/value gradients left as each rank's share (no group sum)."""
    from zerofx.passes.tensor_parallel import rewrite

    def keep_share(node, state, full, tp, tp_rank, group):
        state[node] = state[node].of

    rewrite._sum_over_group = keep_share
    return _body(rank, world, name, tp, stage, steps, out_dir)


@pytest.mark.slow
def test_without_the_group_sum_the_losses_drift(tmp_path):
    """The control of the comparisons above: the same run without summing the grouped
    key/value gradient parts from one process from step 2 on."""
    pytest.importorskip("transformers")
    from hf_models import one_process_reference

    results = run_ranks(_body_without_group_sum, 4, args=("llama", 4, 1, 2, str(tmp_path)),
                        timeout_s=300)
    _, want, _ = one_process_reference("llama", 2, 1, 1e-2)
    losses = results[0][0]
    assert losses[0] == pytest.approx(want[0][0], abs=1e-5)  # the first forward is right
    assert abs(losses[1] - want[0][1]) > 1e-3, (losses, want)  # measured: 3.4e-2


def test_key_value_heads_that_do_not_divide_the_ranks_stay_whole_with_the_reason():
    """12 query heads, 3 key/value heads, 4 ranks: no rank group holds whole heads (the
    query heads of rank 1 read key/value heads 0 and 1), so the fused projection stays
    whole, and the reason says so; 2 key/value heads of 4 query heads at 4 ranks split
    into groups."""
    from test_tp_fused import FusedAttention
    from zerofx.tp import discovery as D

    def discover(model, tp):
        gm, names = D.trace_forward(model, (torch.randn(2, 5, model.qkv.in_features),))
        whole = {}
        found = D.discover(gm, D.find_weights(gm, names), tp, whole=whole)
        return {f.name: f.regions for f in found}, whole

    found, whole = discover(FusedAttention(d=24, heads=12, kv_heads=3), 4)
    assert "qkv.weight" not in found and "o.weight" not in found
    assert "3 key/value heads are fewer than the 4 ranks" in whole["qkv.weight"]
    found, whole = discover(FusedAttention(d=16, heads=4, kv_heads=2), 4)
    assert found["qkv.weight"] == ((16, False), (8, 2), (8, 2)) and not whole
