"""Micro-benchmarks under pytest-benchmark, each next to its peer at its strongest setting,
with a saved baseline to compare against:

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-storage=benchmarks/.benchmarks \
        --benchmark-compare                       # against the committed baseline
    ... --benchmark-save=<name>                   # record a new one (say which machine)

Not part of the test suite (testpaths = tests) and never timed there. Shapes: one flat fp32
shard of 4M elements (a ZeRO shard of a ~10M-parameter model on 2-3 ranks), gradients in
bf16 as zerofx's buckets hold them.
"""
import pytest
import torch

from zerofx.runtime import fused_optim
from zerofx.runtime.fused_optim import AdamHyper

N = 4 * 2**20
HYPER = AdamHyper(weight_decay=0.01)


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert fused_optim.load_kernels(), "the C++ kernels did not build: nothing to measure"


def _state():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, generator=g), torch.randn(N, generator=g).bfloat16(),
            torch.zeros(N), torch.zeros(N), torch.empty(N, dtype=torch.bfloat16))


@pytest.mark.benchmark(group="adam step, 4M fp32 shard, bf16 grads")
def test_zerofx_fused_adam(benchmark):
    p, g, m, v, out = _state()
    step = torch.zeros(())

    def run():
        step.add_(1)
        fused_optim.adam_step_(p, g, m, v, lr=torch.tensor(1e-3), step=step, hyper=HYPER,
                               grad_scale=torch.tensor(1.0), skip=torch.tensor(0.0),
                               param_out=out)
    benchmark(run)


@pytest.mark.benchmark(group="adam step, 4M fp32 shard, bf16 grads")
def test_torch_fused_adamw_peer(benchmark):
    # torch's strongest CPU AdamW: fused=True; it needs the gradient in the parameter's
    # dtype and writes no bf16 copy, so both are charged to it as zerofx does them inside.
    p, g, _, _, out = _state()
    param = torch.nn.Parameter(p)
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, fused=True)

    def run():
        param.grad = g.float()
        opt.step()
        out.copy_(param.detach())
    benchmark(run)


@pytest.mark.benchmark(group="squared norm, 4M bf16")
def test_zerofx_grad_sumsq(benchmark):
    g = _state()[1]
    benchmark(lambda: fused_optim.grad_sumsq(g))


@pytest.mark.benchmark(group="squared norm, 4M bf16")
def test_torch_vector_norm_peer(benchmark):
    g = _state()[1]
    benchmark(lambda: torch.linalg.vector_norm(g, 2, dtype=torch.float32).square())


def test_the_two_adams_agree():
    """The race is only fair if both compute the same update (one step from the same state)."""
    p, g, m, v, out = _state()
    ref = torch.nn.Parameter(p.clone())
    torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.01, fused=True)
    opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.01, fused=True)
    ref.grad = g.float()
    opt.step()
    fused_optim.adam_step_(p, g, m, v, lr=torch.tensor(1e-3), step=torch.ones(()),
                           hyper=HYPER, grad_scale=torch.tensor(1.0), skip=torch.tensor(0.0),
                           param_out=out)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-5, atol=1e-6)
