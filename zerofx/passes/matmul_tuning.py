"""matmul_tuning: pick, per matmul, the fastest way this CPU computes it in bf16/fp16.

CPUs without native bf16 (AVX2, no AVX512-BF16/AMX) run a bf16 GEMM 5-50x slower than fp32
depending on the operands' layouts (measured here: [16,2048]@[2048,512] 44 ms in bf16, 1.2 ms
via fp32). Each candidate below computes the same product: bf16 x bf16 products are exact in
fp32 and every variant accumulates in fp32 and rounds once to the compute dtype, so only the
summation order differs. The pass times the candidates on random tensors of the node's exact
shapes and strides at compile time and keeps the fastest.

    before:  mm = aten.mm(g, w)                                     # bf16, 44 ms
    after:   g32 = convert(g, f32); w32 = convert(w, f32)
             mm32 = aten.mm(g32, w32); mm = convert(mm32, bf16)    # same values, 1.5 ms
or           wc = aten.t(aten.clone(aten.t(w)));  mm = aten.mm(g, wc)   # column-major w

CUDA graphs are left alone (their tensor cores are native bf16).
"""
from __future__ import annotations

import time

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from zerofx.passes.context import PassContext
from zerofx.passes.nodes import cast_node

aten = torch.ops.aten
TUNED = {aten.mm.default: 2, aten.addmm.default: 3, aten.bmm.default: 2}  # tensor args
LOW = (torch.bfloat16, torch.float16)


def matmul_tuning_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rewrite each CPU low-precision mm/addmm/bmm into its fastest equivalent form."""
    chosen: dict[tuple, str] = {}  # one timing per distinct signature in this graph
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in TUNED or not _tunable(node):
            continue
        key = _signature(node)
        if key not in chosen:
            chosen[key] = _fastest(node)
        if chosen[key] == "fp32":
            _via_fp32(gm.graph, node)
        elif chosen[key] == "colmajor":
            _colmajor_second(gm.graph, node)
    return gm


def _tunable(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dtype in LOW and val.device.type == "cpu"
            and all(isinstance(a, fx.Node) for a in node.args[:TUNED[node.target]]))


def _hint(x) -> int:
    """A size as a number: a symbolic one (dynamic shapes, e.g. a last, smaller batch) by the
    value it was traced with; timing needs real tensors."""
    if isinstance(x, int):
        return x
    hint = getattr(getattr(x, "node", None), "hint", None)
    return int(hint) if hint is not None else 16  # unbacked: any plausible size will do


def _shape(v) -> tuple:
    return tuple(_hint(d) for d in v.shape), tuple(_hint(d) for d in v.stride())


def _signature(node: fx.Node) -> tuple:
    vals = [a.meta["val"] for a in node.args[:TUNED[node.target]]]
    return (node.target, *((*_shape(v), v.dtype) for v in vals),
            tuple(map(str, node.args[TUNED[node.target]:])),
            tuple(sorted((k, str(v)) for k, v in node.kwargs.items())))


def _fastest(node: fx.Node) -> str:
    n = TUNED[node.target]
    metas = [a.meta["val"] for a in node.args[:n]]
    rest, kwargs = node.args[n:], node.kwargs
    with unset_fake_temporarily(), torch.no_grad():
        real = []
        for m in metas:
            shape, stride = _shape(m)
            t = torch.randn(shape, dtype=m.dtype)
            real.append(t.as_strided(shape, stride) if _dense(m) else t)
        low = real[-1].dtype
        variants = {
            "asis": lambda: node.target(*real, *rest, **kwargs),
            "fp32": lambda: node.target(*(t.float() for t in real), *rest, **kwargs).to(low),
            "colmajor": lambda: node.target(*real[:-1], real[-1].mT.contiguous().mT, *rest,
                                            **kwargs),
        }
        return min(variants, key=lambda k: _time(variants[k]))


def _dense(meta) -> bool:
    """Strides that describe a non-overlapping view of exactly numel elements."""
    return meta.is_contiguous() or meta.mT.is_contiguous()


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: first calls pick kernels and allocate
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _via_fp32(graph: fx.Graph, node: fx.Node) -> None:
    low = node.meta["val"].dtype
    n = TUNED[node.target]
    with graph.inserting_before(node):
        ups = [cast_node(graph, a, torch.float32) for a in node.args[:n]]
    node.args = (*ups, *node.args[n:])
    node.meta.pop("val")  # now fp32; the pipeline recomputes it
    with graph.inserting_after(node):
        down = cast_node(graph, node, low)
    node.replace_all_uses_with(down, delete_user_cb=lambda u: u is not down)


def _colmajor_second(graph: fx.Graph, node: fx.Node) -> None:
    n = TUNED[node.target]
    b = node.args[n - 1]
    with graph.inserting_before(node):
        bt = graph.call_function(aten.transpose.int, (b, -2, -1))
        copy = graph.call_function(aten.clone.default, (bt,),
                                   {"memory_format": torch.contiguous_format})
        col = graph.call_function(aten.transpose.int, (copy, -2, -1))
    node.args = (*node.args[:n - 1], col, *node.args[n:])
