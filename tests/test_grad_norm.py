"""zerofx::grad_sumsq (csrc/grad_norm.cpp) against a float64 transcription and the fallback."""
import pytest
import torch

from zerofx.runtime.fused_optim import grad_sumsq, load_kernels
from zerofx.runtime.optim_ops import grad_sumsq_fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 33, 4097, 100_003])
def test_matches_float64_sum_of_squares(dtype, n):
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    want = g.double().square().sum()
    got = grad_sumsq(g)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_sumsq_fallback(g).double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_anywhere_is_non_finite(bad):
    g = torch.randn(10_001).bfloat16()
    g[9_999] = bad
    assert not torch.isfinite(grad_sumsq(g))


def test_kernel_is_the_cpu_implementation():
    if not load_kernels():
        pytest.skip("C++ kernels not built here (no compiler or ninja): the fallback runs")
    g = torch.randn(1000)
    assert torch.equal(torch.ops.zerofx.grad_sumsq(g), grad_sumsq(g))
