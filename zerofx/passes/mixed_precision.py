"""mixed_precision: run matmul-class ops in bf16/fp16 while master weights stay fp32.

Runs on the joint (forward + backward) graph, so the forward cast and the backward matmuls
change together and saved activations are stored in the compute dtype, as under autocast.
The op policy is torch.autocast's: matmuls, convolutions and attention take compute-dtype
inputs; softmax, norms, losses, exp/log and reductions take fp32; everything else follows
aten's type promotion.

    before:  t = aten.t(w);              y = aten.addmm(b, x, t)
    after:   w16 = convert(w, bf16);     t = aten.t(w16)
             b16 = convert(b, bf16);     x16 = convert(x, bf16);  y = aten.addmm(b16, x16, t)

Each parameter is cast once per step, however often it is used: casts of a view of a
parameter are hoisted to the parameter and the view replayed on the cast (later ZeRO issues
swap that cast for the all-gathered compute-dtype copy). Graph outputs (the user's values and
the parameter gradients) are cast back to their original dtypes.
"""
from __future__ import annotations

import torch
from torch import fx

from zerofx.passes.context import PassContext
from zerofx.passes.fake_vals import compute_val, fake_mode_of
from zerofx.passes.nodes import cast_node, is_view

aten = torch.ops.aten

# op packet -> how many leading positional args take the compute dtype (None: all tensors).
# Attention backward ops stop before logsumexp, which must stay fp32.
LOWP_OPS = {
    aten.mm: None, aten.addmm: None, aten.bmm: None, aten.baddbmm: None, aten.addbmm: None,
    aten.convolution: 3, aten.convolution_backward: 3,
    aten._scaled_dot_product_flash_attention_for_cpu: 3,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: 5,
    aten._scaled_dot_product_flash_attention: 3,
    aten._scaled_dot_product_flash_attention_backward: 5,
    aten._scaled_dot_product_efficient_attention: 4,
    aten._scaled_dot_product_efficient_attention_backward: 6,
}
FP32_OPS = {
    aten._softmax, aten._log_softmax, aten._softmax_backward_data,
    aten._log_softmax_backward_data, aten.native_layer_norm, aten.native_layer_norm_backward,
    aten.native_group_norm, aten.native_group_norm_backward, aten.exp, aten.log, aten.log1p,
    aten.pow, aten.rsqrt, aten.reciprocal, aten.nll_loss_forward, aten.nll_loss_backward,
    aten.mse_loss, aten.mse_loss_backward, aten.binary_cross_entropy_with_logits,
    aten.sum, aten.mean, aten.var, aten.var_mean, aten.logsumexp, aten.cumsum,
    aten.linalg_vector_norm, aten._fused_rms_norm, aten._fused_rms_norm_backward,
    # Batch norm: its running statistics are fp32 buffers, and the CPU kernels take a low
    # input only with every parameter fp32 (autocast's fp32 masters); all-fp32 is the one
    # form every device's kernel accepts.
    aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training, aten.native_batch_norm,
    aten.native_batch_norm_backward,
}
# Ops writing a source into a destination (position of the source): their kernels require
# one dtype, which the fake values do not check. When the casts above leave the two apart
# (an embedding's backward: zeros made in the weight's low dtype, gradients arriving in
# fp32 from a norm computed in fp32), the source takes the destination's dtype, as it would
# in the eager write.
WRITE_OPS = {
    aten.index_put: 2, aten._unsafe_index_put: 2, aten.index_put_: 2, aten.scatter: 3,
    aten.scatter_add: 3, aten.scatter_reduce: 3, aten.masked_scatter: 2,
    aten.slice_scatter: 1, aten.select_scatter: 1, aten.diagonal_scatter: 1,
    aten.as_strided_scatter: 1, aten.index_add: 3, aten.index_copy: 3,
}


def mixed_precision_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Cast matmul-class inputs to the compute dtype and sensitive ops' inputs to fp32."""
    low = ctx.config.compute_dtype
    original = {n: _dtype(n) for n in gm.graph.nodes}
    mode = fake_mode_of(gm.graph)
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        if packet in LOWP_OPS:
            _cast_args(gm.graph, node, low, LOWP_OPS[packet], casts, mode)
        elif packet in FP32_OPS:
            _cast_args(gm.graph, node, torch.float32, None, casts, mode, only_from=low)
        elif packet in WRITE_OPS:
            _match_destination(gm.graph, node, WRITE_OPS[packet], original, casts, mode)
        # Dtypes flow forward: recompute as we go so later decisions see the new dtypes.
        compute_val(node, mode)
    _restore_output_dtypes(gm.graph, original, casts, mode)
    gm.graph.eliminate_dead_code()  # the fp32 views the casts replaced
    return gm


def _dtype(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _cast_args(graph, node, dtype, leading, casts, mode, *, only_from=None) -> None:
    def convert(i, a):
        if only_from is not None and a == only_from and isinstance(a, torch.dtype):
            # e.g. _log_softmax_backward_data's input_dtype: the op now computes in fp32, and
            # kernels and meta functions disagree on the output dtype when it is left low.
            return dtype
        if not isinstance(a, fx.Node) or (leading is not None and i >= leading):
            return a
        have = _dtype(a)
        if have is None or not have.is_floating_point or have == dtype:
            return a
        if only_from is not None and have != only_from:
            return a
        return _cast_of(graph, a, dtype, casts, mode, node)

    node.args = tuple(convert(i, a) for i, a in enumerate(node.args))


def _match_destination(graph, node, at, original, casts, mode) -> None:
    """The source (argument ``at``) of a write takes the destination's dtype where the
    pass's casts made them differ (they agreed as traced)."""
    dest, src = node.args[0], node.args[at] if len(node.args) > at else None
    if not (isinstance(dest, fx.Node) and isinstance(src, fx.Node)):
        return
    want, have = _dtype(dest), _dtype(src)
    if want is None or have is None or want == have or original.get(dest) != original.get(src):
        return
    args = list(node.args)
    args[at] = _cast_of(graph, src, want, casts, mode, node)
    node.args = tuple(args)


def _cast_of(graph: fx.Graph, value: fx.Node, dtype: torch.dtype, casts, mode,
             consumer: fx.Node) -> fx.Node:
    """One cast per (value, dtype); a view of a cast-able value is replayed on its cast."""
    key = (value, dtype)
    if key in casts:
        return casts[key]
    parent = value.args[0] if is_view(value) else None
    if isinstance(parent, fx.Node) and _dtype(parent) == _dtype(value):
        # Hoist: cast the viewed value once, then replay the view on the cast, so every use
        # shares one cast. The replay goes just before the consumer, not after the cast: a
        # view's shape may be computed in between (symbolic sizes under dynamic shapes,
        # e.g. a last, smaller batch), and the consumer follows both.
        base = _cast_of(graph, parent, dtype, casts, mode, consumer)
        with graph.inserting_before(consumer):
            cast = graph.call_function(value.target, (base, *value.args[1:]), dict(value.kwargs))
    else:
        # A graph input is cast just before its first consumer (the nodes are visited in
        # order): a parameter's cast lands in the forward and serves the backward too, a
        # tangent's stays in the backward, where the partitioner needs it.
        point = graph.inserting_before(consumer) if value.op == "placeholder" \
            else graph.inserting_after(value)
        with point:
            cast = cast_node(graph, value, dtype)
    compute_val(cast, mode)
    casts[key] = cast
    return cast


def _restore_output_dtypes(graph: fx.Graph, original, casts, mode) -> None:
    """Outputs keep the dtype they had: user values, and gradients matching their params."""
    out = graph.output_node()
    flat = list(out.args[0])
    for i, v in enumerate(flat):
        if isinstance(v, fx.Node) and original.get(v) and _dtype(v) != original[v]:
            flat[i] = _cast_of(graph, v, original[v], casts, mode, out)
    out.args = (tuple(flat),)
