"""matmul_form: compute each CPU bf16/fp16 matmul in the form this host runs fastest.

The form comes from the CPU's instruction sets (zerofx/cpu_gemm.py), decided once per run on
rank 0 and handed to every rank through PassContext.matmul_forms, so every rank and every run
compiles the same program; nothing is timed at compile time.

    native:  mm = aten.mm(g, w)                                    # left as traced
    fp32:    g32 = convert(g, f32); w32 = convert(w, f32)
             mm32 = aten.mm(g32, w32); mm = convert(mm32, bf16)   # same products, one rounding

CUDA graphs are left alone (tensor cores are native bf16).
"""
from __future__ import annotations

import torch
from torch import fx

from zerofx.cpu_gemm import host_forms
from zerofx.passes.context import PassContext
from zerofx.passes.fake_vals import compute_val, fake_mode_of
from zerofx.passes.nodes import cast_node

aten = torch.ops.aten
TUNED = {aten.mm.default: 2, aten.addmm.default: 3, aten.bmm.default: 2}  # tensor args
LOW = (torch.bfloat16, torch.float16)


def matmul_form_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rewrite each CPU low-precision mm/addmm/bmm the host lacks native GEMMs for via fp32."""
    forms = dict(ctx.matmul_forms or host_forms(ctx.config.zerofx.matmul_form))
    mode = fake_mode_of(gm.graph)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in TUNED or not _on_cpu(node):
            continue
        if forms[str(node.meta["val"].dtype).removeprefix("torch.")] == "fp32":
            _via_fp32(gm.graph, node, mode)
    return gm


def _on_cpu(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dtype in LOW and val.device.type == "cpu"
            and all(isinstance(a, fx.Node) for a in node.args[:TUNED[node.target]]))


def _via_fp32(graph: fx.Graph, node: fx.Node, mode) -> None:
    """Fake values are kept exact as the rewrite goes: a later matmul of this graph may take
    this one's output as its input (the backward's chain of gradients)."""
    low = node.meta["val"].dtype
    n = TUNED[node.target]
    with graph.inserting_before(node):
        ups = [cast_node(graph, a, torch.float32) for a in node.args[:n]]
    for up in ups:
        compute_val(up, mode)
    node.args = (*ups, *node.args[n:])
    compute_val(node, mode)
    with graph.inserting_after(node):
        down = cast_node(graph, node, low)
    compute_val(down, mode)
    node.replace_all_uses_with(down, delete_user_cb=lambda u: u is not down)
