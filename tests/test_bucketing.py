"""bucketing pass and the collectives it leads to: one per bucket per boundary step."""
import pytest
import torch

from models import make, mlp_batch
from multiproc import run_ranks
from zerofx.passes import PassSpec
from zerofx.passes.nodes import is_cast, is_view


def _cfg(stage, gas, bucket=300):
    return {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket},
            "gradient_accumulation_steps": gas}


@pytest.mark.parametrize("bf16", [False, True])
def test_one_op_per_bucket_after_its_last_gradient(bf16, no_torchrun_env):
    """Each bucket's op right after its last gradient, early enough to overlap the rest of
    the backward: in bf16 too, where mixed_precision leaves the bias gradients' reshapes
    just before the output (they are moved up to what they read)."""
    import zerofx

    model, batch = make("block")
    rt = zerofx.ZeroRuntime(model, {**_cfg(2, 1, bucket=2000), "bf16": {"enabled": bf16}})
    seen = {}

    def keep(gm, ctx):
        seen["bw"], seen["ctx"] = gm, ctx
        return gm

    spy = PassSpec("spy", keep, frozenset({"backward"}), after=("bucketing",))
    compiled = torch.compile(model, backend="zero", options={"runtime": rt,
                                                             "extra_passes": [spy]})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compiled(*batch).backward()
    graph = seen["bw"].graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    ops = [n for n in graph.nodes if n.target == torch.ops.zerofx.reduce_bucket.default]
    assert len(ops) == len(rt.plan.buckets) > 2
    traced = [r.name for r in seen["ctx"].roles if r.kind == "param"]  # the graph's order
    seen = []
    for op in ops:
        names = [traced[k] for k in op.args[2]]
        seen += names
        assert len({rt.plan.slot(n).bucket for n in names}) == 1  # one bucket's worth
        grads = [g for g in op.args[3] if g is not None]
        assert order[op] == max(order[g] for g in grads) + 1  # right after its last grad
    assert sorted(seen) == sorted(traced)
    # a gradient that is a view or cast of what it reads comes right after it (nothing but
    # other such moved nodes in between), so no bucket waits for unrelated compute
    nodes = list(graph.nodes)
    for op in ops:
        for g in (g for g in op.args[3] if g is not None and (is_view(g) or is_cast(g))):
            start = max(order[a] for a in g.all_input_nodes)
            between = nodes[start + 1:order[g]]
            assert all(is_view(n) or is_cast(n) for n in between), (g, between)
    if bf16:
        return
    # the gradients the runtime received are autograd's (eager reference)
    ref, _ = make("block")
    ref.load_state_dict(before)
    ref(*batch).backward()
    for name, p in ref.named_parameters():
        s = rt.plan.slot(name)
        torch.testing.assert_close(rt.state.full_grads[s.offset:s.end].view(s.shape), p.grad,
                                   rtol=1e-5, atol=1e-6)


def _count_body(rank, world, stage, gas):
    import torch.distributed as dist

    import zerofx
    from zerofx.runtime.comm import forms as zero_mod

    calls = []
    real_ar, real_rs = dist.all_reduce, zero_mod._reduce_scatter

    def counting(real, kind):
        def wrapper(*a, **kw):
            calls.append(kind)
            return real(*a, **kw)
        return wrapper

    dist.all_reduce = counting(real_ar, "all_reduce")
    zero_mod._reduce_scatter = counting(real_rs, "reduce_scatter")
    model, _ = make("mlp")
    # the native reduce-scatter pinned (the fastest form is timed otherwise)
    rt = zerofx.ZeroRuntime(model, {**_cfg(stage, gas), "zerofx": {"reduce_form": "reduce_scatter"}})
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    per_micro = []
    for micro in range(2 * gas):
        before = len(calls)
        compiled(*mlp_batch(seed=micro + 7 * rank)).backward()
        per_micro.append(calls[before:])
        rt.step()
    return per_micro, len(rt.plan.buckets)


@pytest.mark.slow
@pytest.mark.parametrize("stage, gas", [(0, 1), (2, 3)])
def test_collectives_only_on_boundary(stage, gas):
    for per_micro, buckets in run_ranks(_count_body, 2, args=(stage, gas)):
        kind = "reduce_scatter" if stage == 2 else "all_reduce"
        for i, calls in enumerate(per_micro):
            boundary = (i + 1) % gas == 0
            assert calls == ([kind] * buckets if boundary else []), (i, calls)


def test_torch_optimizer_hyperparameters_are_honoured(no_torchrun_env):
    import zerofx

    model, batch = make("mlp")
    ref, _ = make("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=3e-2, betas=(0.8, 0.95), weight_decay=0.1)
    rt = zerofx.ZeroRuntime(model, {}, optimizer=opt)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(4):
        compiled(*batch).backward()
        rt.step()
        ref(*batch).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
