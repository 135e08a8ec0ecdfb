"""fp16 loss scaling end to end: the scale at the loss, skip on overflow, no recompiles."""
import logging

import pytest
import torch

from models import make, mlp_batch
from multiproc import run_ranks
from zerofx.passes import PassSpec
from zerofx.passes.nodes import added_by


def _fp16(stage=0, power=8, hysteresis=2, extra=None):
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "fp16": {"enabled": True, "initial_scale_power": power, "hysteresis": hysteresis,
                    "loss_scale_window": 1000},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 300}}
    cfg.update(extra or {})
    return cfg


def _runtime(cfg, name="mlp", extra_passes=()):
    import zerofx

    model, batch = make(name)
    rt = zerofx.ZeroRuntime(model, cfg)
    options = {"runtime": rt, "extra_passes": list(extra_passes)}
    return model, rt, torch.compile(model, backend="zero", options=options), batch


def test_loss_scaled_once_at_the_loss_and_buckets_handed_over(no_torchrun_env):
    graphs = {}

    def spy(kind):
        def keep(gm, ctx):
            graphs[kind] = gm
            return gm
        return PassSpec(f"spy_{kind}", keep, frozenset({kind}))

    model, rt, compiled, batch = _runtime(_fp16(), extra_passes=[spy("backward")])
    ref, _ = make("mlp")
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    rt.backward(compiled(*batch))
    ref(*batch).backward()
    rt.wait_buckets()
    # DeepSpeed's rule: the gradients are those of (loss x scale), scaled exactly once
    for s in rt.plan.params:
        got = rt.state.full_grads[s.offset:s.end].float().view(s.shape) / rt.loss_scale
        want = dict(ref.named_parameters())[s.name].grad
        assert torch.allclose(got, want, rtol=2e-2, atol=1e-3), s.name
    bw = graphs["backward"].graph
    reduces = [n for n in bw.nodes if n.target == torch.ops.zerofx.reduce_bucket.default]
    assert len(reduces) == len(rt.plan.buckets)  # one per bucket (the mlp: one graph)
    assert all(added_by(n) == "bucketing" for n in reduces)
    assert all(v is None for v in bw.output_node().args[0][:4])  # no param grads to autograd


def test_plain_backward_under_fp16_is_refused_before_the_update(no_torchrun_env):
    from zerofx.config import ConfigError

    _, rt, compiled, batch = _runtime(_fp16())
    compiled(*batch).backward()  # the scale never reached the loss
    before = rt.state.master.clone()
    with pytest.raises(ConfigError, match=r"rt.backward\(loss\)"):
        rt.step()
    assert torch.equal(rt.state.master, before)


def test_scale_changes_without_recompiling_or_host_reads(no_torchrun_env, caplog):
    from torch._dynamo.utils import counters

    counters.clear()
    # 2**24 x gradients overflows fp16 (max 65504): the scale must fall, step after step
    _, rt, compiled, batch = _runtime(_fp16(power=24, hysteresis=1))
    scales = []
    with caplog.at_level(logging.WARNING, logger="zerofx.runtime.zero"):
        for _ in range(8):
            rt.backward(compiled(*batch))
            rt.step()
            scales.append(rt.loss_scale)
        rt.flush_report()
    assert scales[0] == 2.0 ** 23 and len(set(scales)) > 3 and rt.skipped_steps >= 3
    assert counters["stats"]["unique_graphs"] == 1  # one Dynamo graph, never recompiled
    step_targets = {str(n.target) for n in rt.step_program.graph.nodes}
    assert not any("local_scalar_dense" in t or "item" in t for t in step_targets)
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skips) == rt.skipped_steps
    assert "loss scale 1.67772e+07 -> 8.38861e+06" in skips[0]


def _snapshot(rt):
    st = rt.state
    return [t.clone() for t in (st.master, st.exp_avg, st.exp_avg_sq, st.flat_params,
                                st.step_count)]


def _inject_body(rank, world, stage):
    torch._dynamo.reset()
    _, rt, compiled, _ = _runtime(_fp16(stage=stage))
    out = []
    for step in range(4):
        x, y = mlp_batch(seed=10 * step + rank)
        if step == 2 and rank == 1:
            x[0, 0] = float("inf")  # only rank 1 sees the bad value
        before = _snapshot(rt)
        rt.backward(compiled(x.half(), y.half()))
        rt.step()
        after = _snapshot(rt)
        out.append((all(torch.equal(a, b) for a, b in zip(before, after)), rt.skipped_steps,
                    rt.loss_scale))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_inf_on_one_rank_skips_step_everywhere(stage):
    for rank_result in run_ranks(_inject_body, 2, args=(stage,)):
        unchanged, skipped, _ = zip(*rank_result)
        assert unchanged == (False, False, True, False)  # bit-for-bit untouched when skipped
        assert skipped == (0, 0, 1, 1)


def _train(cfg, steps=25):
    torch.manual_seed(0)
    _, rt, compiled, _ = _runtime(cfg)
    losses = []
    for step in range(steps):
        x, y = mlp_batch(n=16, seed=0)  # one batch: a smooth curve to compare
        dtype = torch.float16 if cfg.get("fp16") else torch.float32
        loss = compiled(x.to(dtype), y.to(dtype))
        rt.backward(loss)
        rt.step()
        losses.append(loss.item())
    return losses


def test_fp16_converges_like_fp32(no_torchrun_env):
    fp32 = _train({"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    torch._dynamo.reset()
    fp16 = _train(_fp16(power=8))
    assert fp32[-1] < 0.3 * fp32[0]  # a real curve, not a flat line
    for a, b in zip(fp16, fp32):
        assert abs(a - b) <= 0.03 * b


def test_fp16_with_early_overflows_still_trains(no_torchrun_env):
    losses = _train(_fp16(power=16), steps=30)  # 2**16 overflows at first: skips, then trains
    assert losses[-1] < 0.5 * losses[0]


def test_overflow_at_the_minimum_scale_stops_training_as_deepspeed_does(no_torchrun_env):
    from zerofx.runtime.zero import LossScaleError

    cfg = _fp16(power=1, hysteresis=1)
    cfg["fp16"]["min_loss_scale"] = 2.0  # the scale starts at its floor
    _, rt, compiled, (x, y) = _runtime(cfg)
    bad = x.clone()
    bad[0, 0] = float("inf")
    rt.backward(compiled(bad, y))
    rt.step()  # skipped at the floor: DeepSpeed raises here, zerofx at its next host check
    before = [t.clone() for t in (rt.state.master, rt.state.exp_avg, rt.state.flat_params)]
    rt.backward(compiled(x, y))
    with pytest.raises(LossScaleError, match="min_loss_scale 2"):
        rt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (rt.state.master, rt.state.exp_avg,
                                                          rt.state.flat_params)))
