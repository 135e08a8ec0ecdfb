"""Tensor parallelism through Inductor on a Hugging Face model (2 real gloo ranks, slow).

The passes run on the graphs as the model's ops (a cross-entropy, a slice's backward), and
Inductor's decompositions are applied after them: Llama without a plan (rotate_half's slices,
grouped-query attention, split vocabulary) trains like one process, and what Inductor
compiles is decomposed (no log-softmax or slice_backward left) with the TP collectives in it.
"""
import pytest
import torch

from multiproc import run_ranks
from test_tensor_parallel import LR, _cfg, _relative_difference

UNDECOMPOSED = ("aten._log_softmax.", "aten.nll_loss_forward.", "aten.slice_backward.")


def _body(rank, world, steps):
    import torch._inductor.compile_fx as inductor

    import zerofx
    from hf_models import hf_batch, make_hf

    seen = []  # the ops of every graph handed to Inductor
    compile_inner = inductor.compile_fx_inner

    def recording(gm, *args, **kwargs):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return compile_inner(gm, *args, **kwargs)

    inductor.compile_fx_inner = recording
    cfg = _cfg(clip=1.0, extra={"tensor_parallel": {"size": 2}, "zerofx": {"inductor": True}})
    engine, *_ = zerofx.initialize(model=make_hf("llama"), config=cfg)
    losses = []
    for step in range(steps):
        out = engine(**hf_batch("llama", 10 * step))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    pieces = {s.name: engine.runtime.local_param(s.name).float().clone()
              for s in engine.runtime.plan.params}
    styles = {c.module: c.style for c in engine.runtime.plan.tp_choices}
    return losses, pieces, {s.name: s.tp for s in engine.runtime.plan.params}, styles, seen


@pytest.mark.slow
def test_hf_llama_tp2_through_inductor_splits_the_vocabulary_and_trains_like_one_process():
    pytest.importorskip("transformers")
    from hf_models import hf_batch, make_hf
    from reference import deepspeed_step

    steps = 2
    results = run_ranks(_body, 2, args=(steps,), timeout_s=280)
    model = make_hf("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    want = []
    for step in range(steps):
        out = model(**hf_batch("llama", 10 * step))
        out.loss.backward()
        want.append(out.loss.item())
        deepspeed_step(model, opt, 1.0)
    for rank, (losses, pieces, shards, styles, seen) in enumerate(results):
        assert styles["lm_head"] == "colwise" and styles["model.embed_tokens"] == "vocab"
        torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)
        rel = _relative_difference(model, pieces, shards, tp_rank=rank)
        assert rel <= 2e-5, f"rank {rank}: relative difference {rel:.2e}"
        ops = set().union(*seen)
        assert len(seen) >= 2  # forward and backward went through Inductor
        assert not [op for op in ops if op.startswith(UNDECOMPOSED)], ops
        assert any("all_reduce" in op for op in ops)  # the TP collectives are in them
