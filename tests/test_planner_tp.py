"""zerofx-plan with tensor parallelism (zerofx/planner/split.py): the traced graphs are one
rank's split graphs, so the activations it predicts are what a real TP rank saves."""
import pytest
import torch

import zerofx
from models import Block, block_batch
from multiproc import run_ranks
from test_planner import saved_by_a_step
from zerofx.planner import plan_rank

TP2 = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
       "tensor_parallel": {"size": 2}}


def _saved_on_a_tp_rank(rank, world):
    """Bytes a real TP-2 rank's compiled step saves for its backward, through autograd's
    saved-tensor hooks: each storage once, the parameters' (local pieces are views of the
    flat buffer) not counted: test_planner's count."""
    torch.manual_seed(0)
    # the example inputs: the layout found on the traced graph, as the planner finds it
    # (without them a model that is not Hugging Face's is split by its module tree)
    engine, *_ = zerofx.initialize(model=Block(), config=TP2, example_inputs=block_batch())
    return saved_by_a_step(engine, block_batch())


@pytest.mark.slow
def test_tp2_activations_are_what_a_real_tp2_rank_saves(no_torchrun_env):
    """Issue 30: at TP 2 the planner's saved activations were the whole graph's (the TP-1
    trace's, 24836 bytes here, 49% over); the split graph saves two thirds of that (the
    attention and MLP halves and the vocabulary-parallel loss split, the residual stream
    and norms whole)."""
    measured = run_ranks(_saved_on_a_tp_rank, 2, timeout_s=120)
    whole, _ = plan_rank(Block, {**TP2, "tensor_parallel": {"size": 1}}, block_batch(),
                         world=1)
    for rank, saved in enumerate(measured):
        mem, _ = plan_rank(Block, TP2, block_batch(), world=2, rank=rank)
        # 16532 predicted, 16636 saved: the runtime's parameter-slot index (13 int64), which
        # the planner's trace has no runtime to make, is the difference
        assert mem.activations == pytest.approx(saved, rel=0.02), (rank, mem.graphs, saved)
        assert saved < 0.8 * whole.activations and mem.activations < whole.activations


def test_the_split_trace_leaves_nothing_behind(no_torchrun_env):
    """The split graphs carry the TP all-reduces, priced as collectives over the TP group,
    and no local weight piece counted as an activation; no process group is made, and the
    stand-in state the graphs named is gone with them."""
    import gc

    import torch.distributed as dist

    from zerofx import graph_ops
    from zerofx.config import Config
    from zerofx.planner.split import Pieces
    from zerofx.planner.step_time import measure_host, predict_step_time

    mem, plan = plan_rank(Block, TP2, block_batch(), world=2)
    gc.collect()
    assert not (dist.is_available() and dist.is_initialized())
    assert not any(isinstance(s, Pieces) for s in graph_ops.registered())
    (g,) = mem.graphs
    # the row-parallel outputs, the column-parallel layers' input gradients, the
    # vocabulary-parallel lookup and loss (11 here)
    assert {k for k, _ in g.collectives} == {"all_reduce"} and len(g.collectives) >= 6
    step = predict_step_time(mem, plan, Config.from_dict(TP2), measure_host(torch.bfloat16))
    assert any(what.startswith("tensor-parallel all-reduces") and ms > 0
               for what, ms, _ in step.items)
