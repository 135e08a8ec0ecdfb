"""zerofx::adam_step_: the kernel against torch.optim.Adam/AdamW and against its plain-torch
transcription (optim_ops.adam_step_fallback), over many steps, dtypes, odd sizes and the skip
flag."""
import os
import shutil

import pytest
import torch

from zerofx.runtime import fused_optim, optim_ops
from zerofx.runtime.fused_optim import AdamHyper

# Odd sizes: below, at and across the vector step (16 floats on AVX2) and the thread grain.
SIZES = [1, 7, 16, 17, 33, 1000, 2 * 32768 + 5]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    return fused_optim.load_kernels()


def _can_build() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available() and shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.mark.skipif(not _can_build(), reason="no C++ toolchain (ninja, c++): fallback only")
def test_kernels_are_built():
    # Where the toolchain exists (CI, dev machines) the fallback must not hide a build break.
    assert fused_optim.load_kernels() is True


def _state(n, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    return p, torch.zeros(n), torch.zeros(n), gen


def _t(x):
    return torch.tensor(float(x))


def _run_torch(cls, p0, grads, lrs, **kw):
    ref = p0.clone().requires_grad_(True)
    opt = cls([ref], lr=lrs[0], foreach=False, **kw)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        ref.grad = g.clone()
        opt.step()
    st = opt.state[ref]
    return ref.detach(), st["exp_avg"], st["exp_avg_sq"]


@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("n", [17, 2 * 32768 + 5])
def test_matches_torch_optim_over_many_steps(adam_w_mode, weight_decay, n):
    p, m, v, gen = _state(n)
    grads = [torch.randn(n, generator=gen) for _ in range(40)]
    lrs = [1e-2 * (1 - k / 50) for k in range(40)]  # a schedule: lr changes every step
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    ref_p, ref_m, ref_v = _run_torch(cls, p, grads, lrs, weight_decay=weight_decay,
                                     betas=(0.8, 0.99), eps=1e-6)
    hyper = AdamHyper(betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay,
                      adam_w_mode=adam_w_mode)
    for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
        fused_optim.adam_step_(p, g, m, v, lr=lr, step=step, hyper=hyper)
    torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_scale", [1 / 1024, 0.37])
def test_grad_scale_is_the_unscale_and_clip_coefficient(grad_scale):
    n = 1000
    p, m, v, gen = _state(n)
    scaled = [torch.randn(n, generator=gen) * 1024 for _ in range(10)]
    ref_p, ref_m, ref_v = _run_torch(torch.optim.AdamW, p, [g * grad_scale for g in scaled],
                                     [1e-3] * 10, weight_decay=0.01)
    for step, g in enumerate(scaled, start=1):
        fused_optim.adam_step_(p, g, m, v, lr=1e-3, step=step, grad_scale=grad_scale,
                               hyper=AdamHyper(weight_decay=0.01))
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    # m is a difference of large terms here: bound its error by its scale, not per element.
    torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=1e-6 * ref_m.abs().max().item())


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_are_read_as_stored(grad_dtype):
    n = 1001
    p, m, v, gen = _state(n)
    grads = [torch.randn(n, generator=gen).to(grad_dtype) for _ in range(10)]
    ref_p, _, ref_v = _run_torch(torch.optim.AdamW, p, [g.float() for g in grads], [1e-3] * 10,
                                   weight_decay=0.0)
    for step, g in enumerate(grads, start=1):
        fused_optim.adam_step_(p, g, m, v, lr=1e-3, step=step)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", SIZES)
def test_param_out_is_the_rounded_master_weight(out_dtype, n):
    p, m, v, gen = _state(n)
    out = torch.full((n,), 7.0, dtype=out_dtype)
    for step in range(1, 4):
        fused_optim.adam_step_(p, torch.randn(n, generator=gen), m, v, lr=1e-2, step=step,
                               param_out=out)
        assert torch.equal(out, p.to(out_dtype))


def _fallback(p, g, m, v, out, *, lr, step, grad_scale=1.0, skip=0.0, hyper=AdamHyper()):
    optim_ops.adam_step_fallback(p, g, m, v, out, _t(lr), _t(step), _t(grad_scale), _t(skip),
                                 **fused_optim.adam_kwargs(hyper))


# the largest size (past one vector chunk) with every flag only in the slow run: ~4 s each
@pytest.mark.parametrize("n", SIZES[:-1] + [pytest.param(SIZES[-1], marks=pytest.mark.slow)])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_kernel_agrees_with_plain_torch_fallback(n, bias_correction, adam_w_mode):
    hyper = AdamHyper(weight_decay=0.05, bias_correction=bias_correction, adam_w_mode=adam_w_mode)
    p, m, v, gen = _state(n)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    out, out2 = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    for step in range(1, 21):
        g = torch.randn(n, generator=gen).to(torch.bfloat16)
        kw = dict(lr=3e-3, step=step, grad_scale=0.5, hyper=hyper)
        fused_optim.adam_step_(p, g, m, v, param_out=out, **kw)
        _fallback(p2, g, m2, v2, out2, **kw)
    # Not bitwise: torch's vectorised sqrt is not correctly rounded, the kernel's is.
    for a, b in ((p, p2), (m, m2), (v, v2)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    assert (out.float() - out2.float()).abs().max() <= 2 ** -7 * out.float().abs().max()


def test_bias_correction_off_is_plain_moments():
    n = 50
    p, m, v, gen = _state(n)
    g = torch.randn(n, generator=gen)
    expect_m, expect_v = 0.1 * g, 0.001 * g * g
    expect_p = p - 1e-2 * expect_m / (expect_v.sqrt() + 1e-8)
    fused_optim.adam_step_(p, g, m, v, lr=1e-2, step=1, hyper=AdamHyper(bias_correction=False))
    torch.testing.assert_close(m, expect_m)
    torch.testing.assert_close(v, expect_v)
    torch.testing.assert_close(p, expect_p)


@pytest.mark.parametrize("skip", [torch.tensor(True), torch.tensor(1.0)])
@pytest.mark.parametrize("impl", ["kernel", "fallback"])
def test_skip_leaves_everything_untouched(skip, impl):
    n = 37
    p, m, v, gen = _state(n)
    m.uniform_(generator=gen)
    v.uniform_(generator=gen)
    out = torch.randn(n, generator=gen).half()
    before = [t.clone() for t in (p, m, v, out)]
    g = torch.full((n,), float("inf")).half()  # the overflow the flag reports
    if impl == "kernel":
        fused_optim.adam_step_(p, g, m, v, lr=1e-2, step=3, skip=skip, param_out=out)
    else:
        optim_ops.adam_step_fallback(p, g, m, v, out, _t(1e-2), _t(3), _t(1), skip,
                                     **fused_optim.adam_kwargs(AdamHyper()))
    for a, b in zip((p, m, v, out), before):
        assert torch.equal(a, b)


def test_per_step_values_are_tensors_in_the_schema():
    schema = torch.ops.zerofx.adam_step_.default._schema
    types = {a.name: str(a.type) for a in schema.arguments}
    assert all(types[k] == "Tensor" for k in ("lr", "step", "grad_scale", "skip"))
    assert [a.name for a in schema.arguments if a.kwarg_only] == [
        "beta1", "beta2", "eps", "weight_decay", "bias_correction", "adam_w_mode"]


@pytest.mark.parametrize("bad", ["fp64_param", "short_grad", "int_grad", "int_out"])
def test_rejects_malformed_arguments(bad):
    n = 8
    p, m, v, _ = _state(n)
    g, out = torch.ones(n), None
    if bad == "fp64_param":
        p = p.double()
    elif bad == "short_grad":
        g = torch.ones(n - 1)
    elif bad == "int_grad":
        g = torch.ones(n, dtype=torch.int32)
    else:
        out = torch.empty(n, dtype=torch.int8)
    with pytest.raises(RuntimeError):
        fused_optim.adam_step_(p, g, m, v, lr=1e-3, step=1, param_out=out)


def test_traces_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p, m, v = torch.empty(10), torch.empty(10), torch.empty(10)
        torch.ops.zerofx.adam_step_(p, torch.empty(10, dtype=torch.bfloat16), m, v,
                                    torch.empty(10, dtype=torch.bfloat16), *[torch.empty(())] * 4,
                                    **fused_optim.adam_kwargs(AdamHyper()))
