"""matmul_form: rewrites keep every product's value; the form is the host rule's, never a timing."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from zerofx import Config
from zerofx import cpu_gemm
from zerofx.passes import PassContext, PassSpec, run_pipeline
from zerofx.passes.matmul_form import matmul_form_pass
from zerofx.passes.nodes import added_by
from zerofx.plan import make_plan

aten = torch.ops.aten
SPEC = PassSpec("matmul_form", matmul_form_pass, frozenset({"backward"}))
VIA_FP32 = (("bfloat16", "fp32"), ("float16", "fp32"))
NATIVE = (("bfloat16", "native"), ("float16", "native"))


def _graph(fn, *shapes, dtype=torch.bfloat16):
    with FakeTensorMode():
        return make_fx(fn)(*(torch.empty(s, dtype=dtype) for s in shapes))


def _ctx(forms=VIA_FP32, pin="host"):
    cfg = Config.from_dict({"bf16": {"enabled": True}, "zerofx": {"matmul_form": pin}})
    return PassContext(cfg, make_plan([], cfg), "backward", "test", matmul_forms=forms)


def _backward_like(g, w, x):
    """dgrad g @ w, wgrad g.t() @ x, an addmm, and a chain: the first product feeds the next
    (a rewritten matmul's output is another's input, as in a backward)."""
    dgrad = torch.mm(g, w)
    return dgrad, torch.mm(g.t(), x), torch.addmm(x[0], g[:, :512], w[:512]), \
        torch.mm(dgrad, w.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_form_computes_the_same_as_one_fp32_product_rounded_once(dtype):
    shapes = ((16, 2048), (2048, 512), (16, 512))
    gm = _graph(_backward_like, *shapes, dtype=dtype)
    g, w, x = (torch.randn(s).to(dtype) for s in shapes)
    gm = run_pipeline(gm, _ctx(), (SPEC,))
    got = gm(g, w, x)
    # the reference: each product in fp32 from the low inputs, rounded once to the dtype
    d = (g.float() @ w.float()).to(dtype)
    want = (d, (g.float().t() @ x.float()).to(dtype),
            (x[0].float() + g[:, :512].float() @ w[:512].float()).to(dtype),
            (d.float() @ w.float().t()).to(dtype))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    mms = [n for n in gm.graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]
    assert len(mms) == 4  # rewrites change how, never how many, products are taken
    for n in gm.graph.nodes:
        if n.target == aten._to_copy.default:
            assert added_by(n) == "matmul_form"
    for n in mms:  # fake values stay exact as the pass goes (the chain read them mid-pass)
        assert n.meta["val"].dtype == torch.float32


def test_native_form_leaves_the_graph_as_traced():
    gm = _graph(_backward_like, (16, 64), (64, 512), (16, 512))
    before = [n.target for n in gm.graph.nodes]
    gm = run_pipeline(gm, _ctx(NATIVE), (SPEC,))
    assert [n.target for n in gm.graph.nodes] == before


def test_fp32_graphs_are_untouched():
    gm = _graph(lambda a, b: torch.mm(a, b), (4, 8), (8, 3), dtype=torch.float32)
    before = [n.target for n in gm.graph.nodes]
    gm = run_pipeline(gm, _ctx(), (SPEC,))
    assert [n.target for n in gm.graph.nodes] == before


@pytest.mark.parametrize("flags,want", [
    ({"avx2"}, (("bfloat16", "fp32"), ("float16", "fp32"))),
    ({"avx2", "avx512_bf16"}, (("bfloat16", "native"), ("float16", "fp32"))),
    ({"amx_bf16", "avx512_fp16"}, (("bfloat16", "native"), ("float16", "native"))),
])
def test_host_rule_follows_the_cpu_instruction_sets(monkeypatch, flags, want):
    monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda: set(flags))
    assert cpu_gemm.host_forms() == want
    assert cpu_gemm.host_forms("fp32") == VIA_FP32  # the config's pin wins
    assert cpu_gemm.host_forms("native") == NATIVE


def test_without_a_runtime_the_pass_takes_the_host_rule(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda: {"avx2"})
    gm = run_pipeline(_graph(lambda a, b: torch.mm(a, b), (4, 8), (8, 3)), _ctx(()), (SPEC,))
    assert sum(n.target == aten._to_copy.default for n in gm.graph.nodes) == 3
    gm = run_pipeline(_graph(lambda a, b: torch.mm(a, b), (4, 8), (8, 3)),
                      _ctx((), pin="native"), (SPEC,))
    assert not any(n.target == aten._to_copy.default for n in gm.graph.nodes)


def test_compiling_twice_gives_the_same_program():
    """No timing: the same graph and facts always give the same code."""
    codes = {run_pipeline(_graph(_backward_like, (16, 256), (256, 512), (16, 512)), _ctx(),
                          (SPEC,)).code for _ in range(3)}
    assert len(codes) == 1
