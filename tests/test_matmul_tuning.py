"""matmul_tuning: rewrites keep every product's value; the choice is the measured fastest."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from zerofx import Config
from zerofx.passes import PassContext, PassSpec, run_pipeline
from zerofx.passes.matmul_tuning import matmul_tuning_pass
from zerofx.passes.nodes import added_by
from zerofx.plan import make_plan

aten = torch.ops.aten
SPEC = PassSpec("matmul_tuning", matmul_tuning_pass, frozenset({"backward"}))


def _graph(fn, *shapes, dtype=torch.bfloat16):
    with FakeTensorMode():
        return make_fx(fn)(*(torch.empty(s, dtype=dtype) for s in shapes))


def _ctx():
    cfg = Config.from_dict({"bf16": {"enabled": True}})
    return PassContext(cfg, make_plan([], cfg), "backward", "test")


def _backward_like(g, w, x):
    """dgrad g @ w (row-major w: slow in bf16 on AVX2) and wgrad g.t() @ x."""
    return torch.mm(g, w), torch.mm(g.t(), x), torch.addmm(x[0], g[:, :512], w[:512])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rewritten_graph_computes_the_same(dtype):
    gm = _graph(_backward_like, (16, 2048), (2048, 512), (16, 512), dtype=dtype)
    g, w, x = (torch.randn(s).to(dtype) for s in ((16, 2048), (2048, 512), (16, 512)))
    want = [t.float() for t in gm(g, w, x)]
    gm = run_pipeline(gm, _ctx(), (SPEC,))
    got = gm(g, w, x)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-1)
    mms = [n for n in gm.graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]
    assert len(mms) == 3  # rewrites change how, never how many, products are taken
    for n in gm.graph.nodes:  # every helper node is attributed to the pass
        if n.target in (aten._to_copy.default, aten.clone.default):
            assert added_by(n) == "matmul_tuning"


def test_chooses_a_faster_form_for_the_slow_bf16_layout():
    import time

    gm = _graph(lambda g, w: torch.mm(g, w), (16, 2048), (2048, 512))
    g, w = torch.randn(16, 2048).bfloat16(), torch.randn(2048, 512).bfloat16()

    def best(f):
        f()
        return min((lambda t0: (f(), time.perf_counter() - t0)[1])(time.perf_counter())
                   for _ in range(5))

    before = best(lambda: gm(g, w))
    tuned = run_pipeline(gm, _ctx(), (SPEC,))
    after = best(lambda: tuned(g, w))
    assert after <= before * 1.5  # never a real slowdown (timing noise allowed)


def test_fp32_and_non_cpu_graphs_are_untouched():
    gm = _graph(lambda a, b: torch.mm(a, b), (4, 8), (8, 3), dtype=torch.float32)
    before = [n.target for n in gm.graph.nodes]
    gm = run_pipeline(gm, _ctx(), (SPEC,))
    assert [n.target for n in gm.graph.nodes] == before
