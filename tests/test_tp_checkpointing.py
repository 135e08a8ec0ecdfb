"""Tensor parallelism with Hugging Face gradient checkpointing (use_reentrant=False) on real
gloo ranks against one process stepping AdamW with DeepSpeed's clipping.

With checkpointing on, Dynamo compiles GPT-2's body and its LM head as separate graphs: the
vocabulary-split table tied to the head (transformer.wte) then has a graph of its own use
as the head, whose gradient is computed whole on every rank from the whole incoming
gradient of the logits. The tensor_parallel pass cuts it to this rank's rows (it once
refused: "the gradient of transformer.wte.weight comes out split as None"). With sequence
parallelism, the gradient of an activation a graph break hands in leaves gathered whole.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from multiproc import run_ranks


class TiedWithABreak(nn.Module):
    """The cause in miniature: an embedding tied to the LM head, a graph break between them
    (what checkpointing makes in GPT-2), so the head's graph holds the table's head use only,
    and one after the head, so the logits leave that graph whole."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, ids, y):
        h = torch.tanh(self.fc(self.emb(ids)))
        torch._dynamo.graph_break()
        logits = h @ self.emb.weight.t()
        torch._dynamo.graph_break()  # as GPT-2's loss_function: the logits leave gathered
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _tied_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(64, (2, 8), generator=g), torch.randint(64, (2, 8), generator=g)


def _tied_body(rank, world):
    import zerofx
    from test_tensor_parallel import _cfg as tp_cfg

    batch = _tied_batch()
    engine, *_ = zerofx.initialize(model=TiedWithABreak(), config=tp_cfg(),
                                   example_inputs=batch)
    loss = engine(*batch)
    engine.backward(loss)  # stage 0, one DP rank: full_grads holds this rank's pieces
    rt = engine.runtime
    return loss.item(), {s.name: s.tp for s in rt.plan.params}, \
        {s.name: rt.state.full_grads[s.offset:s.end].view(s.shape).clone()
         for s in rt.plan.params}


@pytest.mark.slow  # ~6 s: two ranks
def test_a_tied_table_split_by_rows_gets_its_head_gradient_across_a_graph_break():
    model = TiedWithABreak()
    loss = model(*_tied_batch())
    loss.backward()
    for rank, (got, shards, grads) in enumerate(run_ranks(_tied_body, 2)):
        assert shards["emb.weight"].dim == 0  # split by vocabulary rows
        assert got == pytest.approx(loss.item(), rel=1e-6)
        for n, p in model.named_parameters():
            want = p.grad if shards[n] is None else shards[n].local_piece(p.grad, 2, rank)
            torch.testing.assert_close(grads[n], want, rtol=1e-5, atol=1e-6, msg=n)


def _zero3_cfg():
    """TP 2 x DP 2 with ZeRO-3, nothing kept whole (the models are small)."""
    return {"zero_optimization": {"stage": 3, "reduce_bucket_size": 2000,
                                  "stage3_param_persistence_threshold": 0}}


def _body(rank, world, name, steps, zero3, sp):
    import zerofx
    from hf_models import make_hf, train_on_hf_batches
    from test_tensor_parallel import _cfg as tp_cfg

    model = make_hf(name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = tp_cfg(clip=1.0, stage=3 if zero3 else 1, extra=_zero3_cfg() if zero3 else None)
    cfg["tensor_parallel"]["sequence_parallel"] = sp
    engine, *_ = zerofx.initialize(model=model, config=cfg)
    rt = engine.runtime
    dp_rank = rt.plan.grid.dp_rank(rank)
    losses, _ = train_on_hf_batches(engine, name, steps, dp_rank)
    with rt.gathered_parameters():  # stage 3: this rank's TP piece, gathered over DP
        pieces = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return losses, pieces, {s.name: s.tp for s in rt.plan.params}, dp_rank, \
        rt.plan.grid.tp_rank(rank)


def _check(name, zero3, sp=False, steps=3, bound=1e-5):
    pytest.importorskip("transformers")
    from hf_models import one_process_reference
    from test_tensor_parallel import LR as TP_LR
    from test_tensor_parallel import _relative_difference

    dp = 2 if zero3 else 1
    results = run_ranks(_body, 2 * dp, args=(name, steps, zero3, sp), timeout_s=300)
    model, want, _ = one_process_reference(name, steps, dp, TP_LR)
    for rank, (losses, pieces, shards, dp_rank, tp_rank) in enumerate(results):
        torch.testing.assert_close(losses, want[dp_rank], rtol=1e-5, atol=1e-5)
        rel = _relative_difference(model, pieces, shards, tp_rank=tp_rank)
        assert rel <= bound, f"rank {rank}: relative difference {rel:.2e}"
    return results[0][2]


@pytest.mark.slow
def test_gpt2_split_vocabulary_with_gradient_checkpointing_at_tp2_equals_one_process():
    shards = _check("gpt2", zero3=False)
    assert shards["transformer.wte.weight"].dim == 0  # the tied table really split by rows
    assert shards["transformer.h.0.mlp.c_fc.weight"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_sequence_parallelism_with_gradient_checkpointing_at_tp2_equals_one_process(name):
    # the checkpointed regions are graphs of their own: the gradient of the activation a
    # graph break hands in comes out split over tokens, and must leave gathered (it once
    # failed: "CompiledFunctionBackward returned an invalid gradient ... [1, 8, 32]")
    _check(name, zero3=False, sp=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_split_vocabulary_with_gradient_checkpointing_at_tp2_dp2_zero3(name):
    shards = _check(name, zero3=True, bound=2e-5)  # test_tp_zero3's bound for these models
    table = "transformer.wte.weight" if name == "gpt2" else "model.embed_tokens.weight"
    assert shards[table].dim == 0
