"""passes/gather_out.py: no executed graph calls gloo's coalesced all-gather (it corrupts the
heap when two of its works finish at once, torch 2.13); the _out form gathers the same bytes.

benchmarks/gloo_gather_race.py is the control: the same rounds through the unrewritten op
abort a rank, usually within a few hundred rounds."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from multiproc import run_ranks

GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default
GATHER_OUT = torch.ops._c10d_functional.all_gather_into_tensor_out.default
SHAPES = [(3,), (2, 5), (1, 4, 2)]  # gathered along dim 0


def _gathers(xs, group):
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return [gather(x, 0, group) * 1 for x in xs]  # "* 1": a use after the wait


def _traced(group, xs):
    """The gathers of ``xs``' shapes as make_fx records them (real tensors, real group)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(lambda *a: _gathers(a, group))(*xs)


def _rewrite(gm):
    from zerofx.config import Config
    from zerofx.passes import PassContext
    from zerofx.passes.gather_out import gather_out_pass
    from zerofx.plan import make_plan

    cfg = Config.from_any({})
    ctx = PassContext(cfg, make_plan([], cfg), "forward", "t_forward")
    gm = gather_out_pass(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return gm


def _inputs(rank):
    g = torch.Generator().manual_seed(rank + 1)  # every rank its own values
    return [torch.randn(s, generator=g) for s in SHAPES]


def _rewrite_body(rank, world):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    group = dist.group.WORLD
    gm = _traced(group, [torch.zeros(s) for s in SHAPES])
    before = sum(n.target is GATHER for n in gm.graph.nodes)
    plain = [t.clone() for t in gm(*_inputs(rank))]
    gm = _rewrite(gm)
    kinds = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    buffers = [n.kwargs["out"].meta["val"].shape for n in gm.graph.nodes
               if n.target is GATHER_OUT]
    rewritten = gm(*_inputs(rank))
    return before, kinds.count(GATHER), kinds.count(GATHER_OUT), buffers, plain, rewritten


def test_rewritten_gathers_give_every_ranks_values_in_rank_order():
    """Each gather (1-d to 3-d) becomes an _out gather into a buffer of the gathered shape,
    and the graph returns what the plain gathers did: every rank's input, in rank order,
    as torch.cat of the ranks' own values computes it here."""
    world = 2
    results = run_ranks(_rewrite_body, world, timeout_s=120)
    expected = [torch.cat(xs) for xs in zip(*[_inputs(r) for r in range(world)])]
    for before, left, out, buffers, plain, rewritten in results:
        assert (before, left, out) == (len(SHAPES), 0, len(SHAPES))
        assert [tuple(b) for b in buffers] == [tuple(e.shape) for e in expected]
        for e, p, r in zip(expected, plain, rewritten):
            assert torch.equal(p, e) and torch.equal(r, e)


def _stress_body(rank, world, rounds):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    # 16 one-element gathers in flight at once: what aborts the unrewritten op
    gm = _rewrite(_traced(dist.group.WORLD, [torch.zeros(1)] * 16))
    want = torch.arange(1, world + 1, dtype=torch.float32)
    for _ in range(rounds):
        outs = gm(*[torch.full((1,), float(rank + 1))] * 16)
        assert all(torch.equal(o, want) for o in outs)
    return rounds


@pytest.mark.slow
def test_many_small_gathers_in_flight_do_not_corrupt_the_heap():
    """2,000 rounds of 16 gathers in flight: the unrewritten op aborts a rank ("unaligned
    tcache chunk") within a few hundred rounds in most runs (benchmarks/gloo_gather_race.py);
    the rewritten graph finishes, every result right."""
    assert run_ranks(_stress_body, 2, args=(2000,), timeout_s=240) == [2000, 2000]


# ---- the pipeline: no executed graph keeps the coalesced gather ------------------------
class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x, y):
        return F.mse_loss(self.fc2(F.gelu(self.fc1(x))), y)


def _recorder(seen: list):
    from zerofx.passes import PassSpec

    def record(gm, ctx):
        targets = [n.target for n in gm.graph.nodes]
        seen.append((ctx.graph_kind, targets.count(GATHER), targets.count(GATHER_OUT)))
        return gm
    return PassSpec("record_gathers", record,
                    frozenset({"forward", "backward", "inference", "optimizer"}))


def _pipeline_body(rank, world):
    import zerofx

    model, seen = _Mlp(), []
    cfg = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 500},
           "zerofx": {"gather_form": "all_gather"}}  # the step's gathers in the graph
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero",
                             options={"runtime": rt, "extra_passes": (_recorder(seen),)})
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        compiled(torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)).backward()
        rt.step()
    return seen


def test_no_executed_graph_keeps_the_coalesced_gather():
    """ZeRO-2 with the step's all-gathers as graph collectives: the optimizer graph gathers
    through the _out form only (the recorder runs after every zerofx pass)."""
    for seen in run_ranks(_pipeline_body, 2, timeout_s=180):
        assert {k for k, _, _ in seen} >= {"forward", "backward", "optimizer"}
        assert all(left == 0 for _, left, _ in seen)
        assert sum(out for k, _, out in seen if k == "optimizer") > 0
