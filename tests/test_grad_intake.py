"""GradIntake on one process: arrivals from several graphs, in-order launches, zeros for
parameters without a gradient, late gradients refused."""
import pytest
import torch
from torch import nn

from zerofx.runtime.grad_intake import LateGradientError


def _runtime(gas=1):
    import zerofx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    rt = zerofx.ZeroRuntime(model, {"zero_optimization": {"reduce_bucket_size": 20},
                                    "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                                    "gradient_accumulation_steps": gas})
    return model, rt


def _slots(rt, bucket):
    names = rt.plan.buckets[bucket].params
    return [i for i, s in enumerate(rt.plan.params) if s.name in names]


def test_buckets_launch_in_order_only_when_complete(no_torchrun_env):
    _, rt = _runtime()
    it = rt.intake
    it._learned = True
    assert len(rt.plan.buckets) == 3
    for b in range(3):
        it.expect(_slots(rt, b))
    # bucket 1 completes first (another graph's backward): it must wait for bucket 0
    it.take(_slots(rt, 1), [torch.ones(rt.plan.params[i].numel) for i in _slots(rt, 1)])
    assert it._launched == 0
    it.take(_slots(rt, 0), [torch.ones(rt.plan.params[i].numel) for i in _slots(rt, 0)])
    assert it._launched == 2  # 0 and the waiting 1 together; 2 still missing
    it.wait()
    assert it._launched == 3


def test_missing_gradients_are_zero_and_old_values_do_not_leak(no_torchrun_env):
    _, rt = _runtime()
    rt.state.full_grads.fill_(7.0)  # stale values of an earlier step
    slots = _slots(rt, 0)
    first = slots[:1]
    rt.intake.take(first, [torch.full((rt.plan.params[first[0]].numel,), 2.0)])
    rt.intake.wait()
    for i, s in enumerate(rt.plan.params):
        got = rt.state.full_grads[s.offset:s.end]
        assert torch.all(got == (2.0 if i in first else 0.0)), s.name


def test_two_graphs_add_into_one_parameter(no_torchrun_env):
    _, rt = _runtime(gas=2)
    (i, *_) = _slots(rt, 0)
    n = rt.plan.params[i].numel
    for micro in range(2):  # two graphs in each of two micro-steps
        rt.intake.take([i], [torch.ones(n)])
        rt.intake.take([i], [torch.ones(n)])
        rt.intake.end_micro_step(boundary=False)
    s = rt.plan.params[i]
    assert torch.all(rt.state.full_grads[s.offset:s.end] == 4.0)


def test_gradient_after_its_bucket_was_reduced_is_an_error(no_torchrun_env):
    _, rt = _runtime()
    rt.intake.finish()  # the boundary's backward ended: every bucket launched
    (i, *_) = _slots(rt, 0)
    with pytest.raises(LateGradientError, match="once per micro-step"):
        rt.intake.take([i], [torch.ones(rt.plan.params[i].numel)])


def test_eager_gradient_goes_to_the_bucket_and_not_to_p_grad(no_torchrun_env):
    model, rt = _runtime()
    x = torch.randn(2, 4)
    model(x).sum().backward()  # plain eager autograd: the hooks take every gradient
    assert all(p.grad is None for p in model.parameters())
    ref = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    ref.load_state_dict(model.state_dict())
    ref(x).sum().backward()
    rt.intake.wait()
    for name, p in ref.named_parameters():
        s = rt.plan.slot(name)
        torch.testing.assert_close(rt.state.full_grads[s.offset:s.end].view(s.shape), p.grad)


def test_predivide_factor_scales_before_the_reduction_and_not_the_update(no_torchrun_env):
    import zerofx

    def train(extra):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        cfg = {"optimizer": {"type": "Adam", "params": {"lr": 1e-2}}, **extra}
        rt = zerofx.ZeroRuntime(model, cfg)
        compiled = torch.compile(model, backend="zero", options={"runtime": rt})
        for step in range(3):
            x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
            rt.backward(compiled(x).square().mean())
            if step == 0:
                rt.wait_buckets()
                first = rt.state.full_grads.clone()
            rt.step()
        return first, torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    plain_grads, plain = train({})
    split_grads, split = train({"gradient_predivide_factor": 4.0})
    torch.testing.assert_close(split_grads, plain_grads / 4)  # before the (1-rank) reduction
    torch.testing.assert_close(split, plain)  # the step divides by what is left


def test_untested_optimizer_with_zero_needs_consent(no_torchrun_env):
    import zerofx

    model = nn.Linear(4, 4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(zerofx.ConfigError, match="zero_allow_untested_optimizer"):
        zerofx.ZeroRuntime(model, {"zero_optimization": {"stage": 1}}, optimizer=sgd)
    zerofx.ZeroRuntime(model, {"zero_optimization": {"stage": 1},
                               "zero_allow_untested_optimizer": True}, optimizer=sgd)
