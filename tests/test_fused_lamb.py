"""zerofx::lamb_moments_ / lamb_apply_: sharded LAMB against the unsharded lamb_reference
(DeepSpeed's FusedLamb transcribed), the kernels against their plain-torch fallback, and ZeRO
LAMB on 2 gloo processes against one process, with a tensor straddling the shard boundary."""
import math

import pytest
import torch
import torch.distributed as dist

from multiproc import run_ranks
from zerofx.runtime import fused_optim, optim_ops
from reference import lamb_reference
from zerofx.runtime.fused_optim import LambHyper

# Tensor sizes of one flat buffer: odd sizes, one of a single element, one of all zeros below.
SIZES = [1000, 17, 33333, 1, 4096, 5]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    return fused_optim.load_kernels()


def _bounds(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def _problem(sizes, steps, *, seed=0, grad_dtype=torch.float32):
    """Initial flat weights (tensor 3 all zeros: trust ratio 1) and per-step flat gradients."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    flat = torch.randn(n, generator=gen)
    if len(sizes) > 3:
        b = _bounds(sizes)
        flat[b[3]:b[4]] = 0
    grads = [torch.randn(n, generator=gen).to(grad_dtype) for _ in range(steps)]
    return flat, grads


def _reference(sizes, flat, grads, *, hyper, lrs, grad_scales=None):
    grad_scales = grad_scales or [1.0] * len(grads)
    params = [t.clone() for t in flat.split(sizes)]
    ms, vs = [torch.zeros(s) for s in sizes], [torch.zeros(s) for s in sizes]
    ratios = []
    for step, (g, lr, gs) in enumerate(zip(grads, lrs, grad_scales), start=1):
        ratios.append(lamb_reference(params, list(g.split(sizes)), ms, vs, lr=lr,
                                                 step=step, hyper=hyper, grad_scale=gs))
    return torch.cat(params), torch.cat(ms), torch.cat(vs), ratios


def _run_shards(sizes, flat, grads, cuts, *, hyper, lrs, grad_scales=None, out_dtype=None):
    """Sharded LAMB in one process: shards [cuts[k], cuts[k+1]), partial sums added by hand."""
    grad_scales = grad_scales or [1.0] * len(grads)
    bounds = _bounds(sizes)
    shards = [(a, b) for a, b in zip(cuts, cuts[1:])]
    ps = [flat[a:b].clone() for a, b in shards]
    ms, vs = [torch.zeros(b - a) for a, b in shards], [torch.zeros(b - a) for a, b in shards]
    outs = [torch.empty(b - a, dtype=out_dtype) if out_dtype else None for a, b in shards]
    ratios = []
    for step, (g, lr, gs) in enumerate(zip(grads, lrs, grad_scales), start=1):
        sums = sum(fused_optim.lamb_moments_(ps[k], g[a:b], ms[k], vs[k], bounds, hyper=hyper,
                                             grad_scale=gs, shard_offset=a)
                   for k, (a, b) in enumerate(shards))
        ratio = fused_optim.lamb_trust_ratio(sums, hyper=hyper)
        for k, (a, _) in enumerate(shards):
            fused_optim.lamb_apply_(ps[k], ms[k], vs[k], bounds, ratio, lr=lr, step=step,
                                    hyper=hyper, shard_offset=a, param_out=outs[k])
        ratios.append(ratio.tolist())
    return torch.cat(ps), torch.cat(ms), torch.cat(vs), ratios, outs, ps


def _assert_matches_reference(got, want):
    p, m, v, ratios = got[:4]
    rp, rm, rv, rratios = want
    torch.testing.assert_close(m, rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p, rp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ratios), torch.tensor(rratios, dtype=torch.float32),
                               rtol=1e-5, atol=0)


HYPERS = [
    LambHyper(),
    LambHyper(weight_decay=0.01, eps_inside_sqrt=True),
    LambHyper(weight_decay=0.1, bias_correction=False, betas=(0.8, 0.95), eps=1e-6),
    LambHyper(weight_decay=0.01, max_coeff=0.3, min_coeff=0.2),  # the clamps bind
]


@pytest.mark.parametrize("hyper", HYPERS)
def test_single_shard_matches_reference_over_many_steps(hyper):
    flat, grads = _problem(SIZES, 15)
    lrs = [1e-2 * 0.9**k for k in range(15)]
    scales = [0.25] * 15
    want = _reference(SIZES, flat, grads, hyper=hyper, lrs=lrs, grad_scales=scales)
    got = _run_shards(SIZES, flat, grads, [0, sum(SIZES)], hyper=hyper, lrs=lrs,
                      grad_scales=scales)
    _assert_matches_reference(got, want)
    assert got[3][0][3] == want[3][0][3] == 1.0  # the all-zero tensor's first step: ratio 1


def test_shards_cutting_tensors_match_the_unsharded_step():
    # Cuts inside tensors 0 and 2, one on a tensor boundary, one leaving a 1-element shard.
    n = sum(SIZES)
    cuts = [0, 500, 1017, 20000, 20001, n]
    flat, grads = _problem(SIZES, 10, seed=1)
    hyper = LambHyper(weight_decay=0.01)
    lrs = [1e-2] * 10
    want = _reference(SIZES, flat, grads, hyper=hyper, lrs=lrs)
    _assert_matches_reference(_run_shards(SIZES, flat, grads, cuts, hyper=hyper, lrs=lrs), want)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_and_weight_copies(grad_dtype, out_dtype):
    sizes = [300, 45, 1001]
    flat, grads = _problem(sizes, 5, grad_dtype=grad_dtype)
    hyper, lrs = LambHyper(weight_decay=0.01), [1e-2] * 5
    want = _reference(sizes, flat, grads, hyper=hyper, lrs=lrs)
    got = _run_shards(sizes, flat, grads, [0, 600, 1346], hyper=hyper, lrs=lrs,
                      out_dtype=out_dtype)
    _assert_matches_reference(got, want)
    for p, out in zip(got[5], got[4]):
        assert torch.equal(out, p.to(out_dtype))


def test_padding_past_the_last_tensor_is_untouched():
    sizes = [10, 7]
    bounds = _bounds(sizes)
    p, m, v = torch.randn(24), torch.rand(24), torch.rand(24)
    before = [t[17:].clone() for t in (p, m, v)]
    g = torch.randn(24)
    g[17:] = float("nan")  # padding gradients are never read into anything
    hyper = LambHyper()
    sums = fused_optim.lamb_moments_(p, g, m, v, bounds, hyper=hyper)
    assert sums.isfinite().all()
    out = torch.zeros(24, dtype=torch.bfloat16)
    fused_optim.lamb_apply_(p, m, v, bounds, fused_optim.lamb_trust_ratio(sums, hyper=hyper),
                            lr=1e-2, step=1, hyper=hyper, param_out=out)
    for t, b in zip((p, m, v), before):
        assert torch.equal(t[17:], b)
    assert torch.equal(out[17:], torch.zeros(7, dtype=torch.bfloat16))


@pytest.mark.parametrize("impl", ["kernel", "fallback"])
def test_skip_leaves_everything_untouched(impl):
    bounds = _bounds([20, 13])
    p, m, v = torch.randn(33), torch.rand(33), torch.rand(33)
    out = p.half()
    before = [t.clone() for t in (p, m, v, out)]
    g = torch.full((33,), float("inf"))
    skip, one = torch.tensor(True), torch.tensor(1.0)
    kw = fused_optim.lamb_kwargs(LambHyper(), apply=False)
    kwa = fused_optim.lamb_kwargs(LambHyper(), apply=True)
    ratio = torch.ones(2)
    if impl == "kernel":
        sums = torch.ops.zerofx.lamb_moments_(p, g, m, v, bounds, one, skip, shard_offset=0, **kw)
        torch.ops.zerofx.lamb_apply_(p, m, v, out, bounds, ratio, one, one, skip, shard_offset=0,
                                     **kwa)
    else:
        sums = optim_ops.lamb_moments_fallback(p, g, m, v, bounds, one, skip, shard_offset=0,
                                               **kw)
        optim_ops.lamb_apply_fallback(p, m, v, out, bounds, ratio, one, one, skip,
                                      shard_offset=0, **kwa)
    assert torch.equal(sums, torch.zeros(2, 2))
    for a, b in zip((p, m, v, out), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
@pytest.mark.parametrize("shard", [(0, 38452), (517, 20001), (20000, 38460)])
def test_kernels_agree_with_plain_torch_fallback(eps_inside_sqrt, shard):
    """Each pass of the kernel against the same pass of the fallback, from the same state."""
    bounds = _bounds(SIZES)  # the last shard runs 8 elements past the end: padding
    a, b = shard
    gen = torch.Generator().manual_seed(2)
    p, m, v = (torch.randn(b - a, generator=gen) for _ in range(3))
    v = v.abs()
    g = torch.randn(b - a, generator=gen).bfloat16()
    kw = dict(shard_offset=a, beta1=torch.tensor(0.9, dtype=torch.float64), beta2=0.99,
              eps=1e-6, weight_decay=0.01, eps_inside_sqrt=eps_inside_sqrt)
    scale, skip = torch.tensor(0.5), torch.tensor(0.0)
    m2, v2 = m.clone(), v.clone()
    sums = torch.ops.zerofx.lamb_moments_(p, g, m, v, bounds, scale, skip, **kw)
    sums2 = optim_ops.lamb_moments_fallback(p, g, m2, v2, bounds, scale, skip, **kw)
    torch.testing.assert_close(m, m2, rtol=0, atol=0)
    torch.testing.assert_close(v, v2, rtol=0, atol=0)
    torch.testing.assert_close(sums, sums2, rtol=2e-6, atol=0)
    ratio = torch.rand(len(SIZES), generator=gen) + 0.5
    p2, out, out2 = p.clone(), torch.zeros(b - a).half(), torch.zeros(b - a).half()
    lr, step = torch.tensor(3e-3), torch.tensor(7.0)
    torch.ops.zerofx.lamb_apply_(p, m, v, out, bounds, ratio, lr, step, skip,
                                 bias_correction=True, **kw)
    optim_ops.lamb_apply_fallback(p2, m, v, out2, bounds, ratio, lr, step, skip,
                                  bias_correction=True, **kw)
    torch.testing.assert_close(p, p2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, out2, rtol=1e-3, atol=0)


def test_trust_ratio_clamps_and_defaults_like_deepspeed():
    hyper = LambHyper(min_coeff=0.01, max_coeff=10.0)
    # columns: ordinary, above max, below min, zero weight, zero update
    sums = torch.tensor([[4.0, 1e6, 1e-8, 0.0, 9.0],
                         [1.0, 1.0, 1.0, 5.0, 0.0]])
    ratio = fused_optim.lamb_trust_ratio(sums, hyper=hyper)
    assert ratio.tolist() == pytest.approx([2.0, 10.0, 0.01, 1.0, 1.0])


def test_reference_follows_deepspeed_formulas():
    """One step of lamb_reference, written out by hand for one 2-element tensor."""
    hyper = LambHyper(weight_decay=0.5, betas=(0.9, 0.99), eps=1e-3)
    p, g = torch.tensor([3.0, -4.0]), torch.tensor([0.2, 0.1])
    m, v = torch.zeros(2), torch.zeros(2)
    expect_m, expect_v = 0.1 * g, 0.01 * g * g
    u = expect_m / (expect_v.sqrt() + 1e-3) + 0.5 * p
    coeff = 5.0 / u.norm().item()
    step_size = 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9)
    ratio = lamb_reference([p], [g], [m], [v], lr=0.1, step=1, hyper=hyper)
    assert ratio == [pytest.approx(coeff)]
    torch.testing.assert_close(p, torch.tensor([3.0, -4.0]) - step_size * coeff * u)


def test_moments_traces_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = torch.empty(100)
        sums = torch.ops.zerofx.lamb_moments_(
            p, torch.empty(100, dtype=torch.bfloat16), torch.empty(100), torch.empty(100),
            torch.empty(7, dtype=torch.int64), torch.empty(()), torch.empty(()), shard_offset=0,
            **fused_optim.lamb_kwargs(LambHyper(), apply=False))
        assert sums.shape == (2, 6) and sums.dtype == torch.float32


def test_rejects_bad_bounds():
    p = torch.zeros(10)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        fused_optim.lamb_moments_(p, p, p.clone(), p.clone(), torch.tensor([0, 6, 4, 10]),
                                  hyper=LambHyper())
    with pytest.raises(RuntimeError, match="int64"):
        fused_optim.lamb_moments_(p, p, p.clone(), p.clone(), torch.tensor([0.0, 10.0]),
                                  hyper=LambHyper())


# ----------------------------------------------------------------- ZeRO LAMB on 2 processes
ZERO_SIZES = [700, 2601, 99, 1]  # tensor 1 spans [700, 3301): it straddles the cut at 1701
ZERO_HYPER = LambHyper(weight_decay=0.01, max_grad_norm=1.0)
LOSS_SCALE = 1024.0


def _zero_rank(rank, world_size, flat, grads, lrs):
    """One rank's shard of the padded flat buffer; norms combined over gloo."""
    from datetime import timedelta

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    fused_optim.load_kernels()
    n = flat.numel()
    per_rank = -(-n // world_size)  # the last shard is padded, as ZeRO pads the flat buffer
    a = rank * per_rank
    pad = lambda t: torch.cat([t, t.new_zeros(per_rank * world_size - n)])  # noqa: E731
    p, m, v = pad(flat)[a:a + per_rank].clone(), torch.zeros(per_rank), torch.zeros(per_rank)
    out = torch.zeros(per_rank, dtype=torch.bfloat16)  # padding: never written
    ratios, scales = [], []
    for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = pad(g)[a:a + per_rank]
        square_sum = g.double().square().sum()
        dist.all_reduce(square_sum)  # the global norm of the (loss-scaled) gradient
        grad_scale = fused_optim.combined_grad_scale(
            LOSS_SCALE, grad_norm=square_sum.sqrt().float(),
            max_grad_norm=ZERO_HYPER.max_grad_norm)
        ratio = fused_optim.lamb_step_(p, g, m, v, _bounds(ZERO_SIZES), lr=lr, step=step,
                                       hyper=ZERO_HYPER, grad_scale=grad_scale, shard_offset=a,
                                       param_out=out, group=dist.group.WORLD)
        ratios.append(ratio.tolist())
        scales.append(grad_scale.item())
    assert torch.equal(out, p.bfloat16())
    return p, m, v, ratios, scales


@pytest.mark.slow
def test_zero_lamb_on_two_processes_equals_one_process():
    flat, grads = _problem(ZERO_SIZES, 8, seed=3)
    grads = [g * LOSS_SCALE for g in grads]
    lrs = [1e-2] * 8
    results = run_ranks(_zero_rank, 2, args=(flat, grads, lrs), timeout_s=120)
    n = flat.numel()
    p, m, v = (torch.cat([r[k] for r in results])[:n] for k in range(3))
    assert results[0][3] == results[1][3]  # every rank applies the same trust ratios
    # DeepSpeed's clip: the norm of the unscaled gradient (~56 here) brought to max_grad_norm.
    scales = [1 / (LOSS_SCALE * ((g.norm().item() / LOSS_SCALE + 1e-6) / 1.0)) for g in grads]
    assert results[0][4] == pytest.approx(scales, rel=1e-5)
    want = _reference(ZERO_SIZES, flat, grads, hyper=ZERO_HYPER, lrs=lrs,
                      grad_scales=results[0][4])
    _assert_matches_reference((p, m, v, results[0][3]), want)
    single = _run_shards(ZERO_SIZES, flat, grads, [0, n], hyper=ZERO_HYPER, lrs=lrs,
                         grad_scales=results[0][4])
    torch.testing.assert_close(p, single[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(results[0][3]), torch.tensor(single[3]), rtol=1e-6,
                               atol=0)
