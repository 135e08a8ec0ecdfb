"""Plain torch.compile(model, backend="zero") on several ranks: the user's own loop and torch
optimizer, gradients averaged as DDP does (runtime/plain_dp.py).

The reference is one process training the same model on the global batch: each rank's
micro-batch loss weighted 1/(ranks x accumulation steps), then the same torch optimizer.
Models include a branch that goes different ways on different ranks (the ranks compile
different graphs and know different parameters) and a tied weight.
"""
import pytest
import torch

from models import make, mlp_batch
from multiproc import run_ranks
from zoo_models import make_zoo, zoo_batch

STEPS = 4


def _model(name):
    return make_zoo(name) if name in ("breaks", "shared") else make(name)[0]


def _batch(name, step, rank, micro):
    seed = 1000 * step + 10 * rank + micro
    return zoo_batch(seed) if name in ("breaks", "shared") else mlp_batch(seed=seed)


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _body(rank, world, name, kind, gas, use_no_sync):
    import zerofx
    from zerofx.runtime import plain_dp

    torch._dynamo.reset()
    plain_dp.reset()
    model = _model(name)
    compiled = torch.compile(model, backend="zero", options={"config": {}})
    opt = _optimizer(kind, [p for p in model.parameters() if p.requires_grad])
    for step in range(STEPS):
        for micro in range(gas):
            quiet = use_no_sync and micro < gas - 1
            with zerofx.no_sync(model) if quiet else _nothing():
                (compiled(*_batch(name, step, rank, micro)) / gas).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _reference(name, kind, world, gas):
    model = _model(name)
    opt = _optimizer(kind, [p for p in model.parameters() if p.requires_grad])
    seen: set[int] = set()
    for step in range(STEPS):
        for micro in range(gas):
            for r in range(world):
                (model(*_batch(name, step, r, micro)) / (world * gas)).backward()
        # Once some rank's graph has read a parameter, the plain path averages its gradient
        # every step, as zero when no rank used it this step (the ZeRO runtime's rule):
        # SGD momentum and AdamW decay then move it, so the reference does the same.
        seen |= {id(p) for p in model.parameters() if p.grad is not None}
        for p in model.parameters():
            if id(p) in seen and p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


CASES = [  # (model, optimizer, accumulation steps, no_sync on all but the last)
    ("mlp", "adamw", 1, False),
    ("mlp", "sgd", 2, True),
    ("breaks", "adamw", 2, False),
    ("shared", "sgd", 1, False),
]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_plain_compile_trains_one_data_parallel_model(world):
    cases = CASES if world == 2 else CASES[1:3]
    for case in cases:
        results = run_ranks(_body, world, args=case, timeout_s=240)
        ref = _reference(case[0], case[1], world, case[2])
        for rank, params in enumerate(results):
            for n, p in params.items():
                torch.testing.assert_close(p, ref[n], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{case} rank {rank} {n}: {m}")


def _counting_body(rank, world):
    """no_sync really skips communication: count all-reduces per backward."""
    import torch.distributed as dist

    import zerofx
    from zerofx.runtime import plain_dp

    plain_dp.reset()
    model = make("mlp")[0]
    compiled = torch.compile(model, backend="zero", options={"config": {}})
    calls = []
    real = dist.all_reduce

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    dist.all_reduce = counted
    try:
        compiled(*mlp_batch(seed=rank)).backward()  # first: layout agreement + buckets
        first = len(calls)
        with zerofx.no_sync(model):
            compiled(*mlp_batch(seed=rank + 5)).backward()
        quiet = len(calls) - first
        compiled(*mlp_batch(seed=rank + 9)).backward()
        steady = len(calls) - first - quiet
    finally:
        dist.all_reduce = real
    return first, quiet, steady


@pytest.mark.slow
def test_no_sync_skips_communication():
    for first, quiet, steady in run_ranks(_counting_body, 2):
        assert quiet == 0 and first >= 2 and steady == 2  # check + one bucket


def _one_rank_refusal(rank, world):
    try:
        torch.compile(make("mlp")[0], backend="zero",
                      options={"config": {"zero_optimization": {"stage": 2}}})(
            *mlp_batch()).backward()
    except torch._dynamo.exc.BackendCompilerFailed as e:
        return str(e.inner_exception)
    return "trained"


@pytest.mark.slow
def test_what_plain_compile_cannot_apply_is_still_refused_on_two_ranks():
    for message in run_ranks(_one_rank_refusal, 2):
        assert "zero_optimization.stage 2" in message and "zerofx.initialize" in message
