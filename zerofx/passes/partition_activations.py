"""partition_activations: DeepSpeed's activation partitioning, on the partitioned pair.

With tensor parallelism the input of a checkpointed region (a transformer block's hidden
states) is the same on every rank of the TP group, yet each rank keeps all of it from the
forward to the recompute in the backward. DeepSpeed (``partition_activations``) keeps 1/tp
of it per rank, this rank's contiguous flat chunk, and all-gathers it over the TP group
before the recompute. Here the same, as a rewrite of the pair the partitioner produced:

    before:  forward  ... h = add(x, wait(all_reduce(mm(...))))  ... return (out, h, ...)
             backward (h, ..., tangents)   ln = native_layer_norm(h, ...)   # recomputed
    after:   forward  ... h = ...; c = clone(slice(reshape(h, [-1]), 0, r*n/tp, (r+1)*n/tp))
                      return (out, c, ...)                                 # 1/tp of h
             backward (c, ..., tangents)
                      h = view(wait(all_gather_into_tensor(c, tp, group)), shape)
                      ln = native_layer_norm(h, ...)

A saved value is partitioned when it is (a) replicated across the TP group (the
tensor_parallel pass records each value's sharding in ``node.meta[META_TP_SHARDING]``; the
partitioner copies it into both graphs), (b) a floating activation computed by the forward,
not a graph input, a parameter or a view of one, and (c) read in the backward by ops the
partitioner recomputes for a checkpointed region (``node.meta["recompute"]``, which Dynamo's
checkpoint regions carry). Values with a dynamic number of elements stay whole. A value
whose element count is not a multiple of tp is padded with zeros to one (DeepSpeed pads the
same way); the padding is sliced off after the gather. The all-gather returns exactly the
chunks the ranks cut, so the backward reads the same bits as without partitioning.
"""
from __future__ import annotations

import logging

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from zerofx.config import ConfigError
from zerofx.passes.context import PassContext
from zerofx.passes.fake_vals import compute_val, fake_mode_of
from zerofx.passes.nodes import (META_PARTITIONED, META_TP_SHARDING, is_cast, is_view,
                                 role_of)

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
log = logging.getLogger(__name__)

_RECOMPUTED = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


def partition_activations_pass(pair, ctx: PassContext):
    """Save 1/tp of each replicated activation a checkpointed recompute reads; all-gather
    it over the TP group in the backward before its first use."""
    fw, bw = pair
    tp = ctx.plan.grid.tp_size
    if tp == 1:
        return pair  # no TP group to split over (configure says so once)
    n_fwd = ctx.num_fwd_outputs
    out = fw.graph.output_node()
    outs = list(out.args[0])
    inputs = {n.name: n for n in bw.graph.nodes if n.op == "placeholder"}
    candidates = [(i, v, inputs[v.name]) for i, v in enumerate(outs[n_fwd:], n_fwd)
                  if isinstance(v, fx.Node) and v.name in inputs
                  and any(is_recomputed(u) for u in inputs[v.name].users)]
    if not candidates:
        return pair
    if not any(META_TP_SHARDING in n.meta for n in fw.graph.nodes):
        if ctx.config.tensor_parallel.size > 1:
            return pair  # zerofx's TP split no weight of this graph: nothing recorded
        raise ConfigError(
            "activation_checkpointing.partition_activations: this model is split across "
            f"{tp} tensor-parallel ranks by its own mpu, so zerofx cannot tell which saved "
            "activations are the same on every rank; set partition_activations false, or "
            "let zerofx split the model (tensor_parallel.size, no mpu)")
    rank = ctx.plan.grid.tp_rank(ctx.plan.rank)
    mode = fake_mode_of(fw.graph)
    kept = set(outs[:n_fwd])  # a model output stays whole anyway: a chunk would add memory
    for i, v, ph in candidates:
        if v in kept or not is_partitionable(v):
            continue
        kept.add(v)  # saved twice: partitioned once, the other slot keeps it whole
        chunk = _cut(fw.graph, v, tp, rank, mode)
        outs[i] = chunk
        _gather(bw.graph, ph, chunk, v.meta["val"], tp, ctx.tp_group, mode)
    out.args = (tuple(outs),)
    return fw, bw


def is_recomputed(node: fx.Node) -> bool:
    """An op the partitioner runs again in the backward for a checkpointed region."""
    return node.meta.get("recompute") in _RECOMPUTED


def is_partitionable(v: fx.Node) -> bool:
    """A floating activation the forward computed, replicated across the TP group, with a
    static element count: not a graph input, a parameter or a view or cast of one."""
    val = v.meta.get("val")
    if v.op != "call_function" or not isinstance(val, torch.Tensor) or \
            not val.is_floating_point() or not isinstance(val.numel(), int):
        return False
    if META_TP_SHARDING not in v.meta or v.meta[META_TP_SHARDING] is not None:
        return False  # split or partial on this rank, or not seen by the TP pass
    node = v
    while is_view(node) or is_cast(node):  # a weight seen through views (t(W), W.to(bf16))
        node = node.args[0]
    if node.op == "placeholder":
        role = role_of(node)
        return role is None or role.kind not in ("param", "buffer")
    # zerofx's own ops that read weights (tp_param, stage 3's gathers) are not activations
    return getattr(node.target, "namespace", None) != "zerofx"


def _dense_order(val: torch.Tensor) -> list[int]:
    """A permutation under which ``val`` is contiguous, so its flat chunks are its storage
    order and the backward restores the same strides (a transposed saved value stays one)."""
    order = sorted(range(val.dim()), key=lambda d: (-val.stride(d), -val.shape[d]))
    permuted = val.permute(order)
    return order if permuted.is_contiguous() else list(range(val.dim()))


def _cut(graph: fx.Graph, v: fx.Node, tp: int, rank: int, mode) -> fx.Node:
    """Right after ``v``: this rank's flat 1/tp chunk of it, a copy (a slice would keep the
    whole value's storage alive)."""
    val = v.meta["val"]
    numel = val.numel()
    size = -(-numel // tp)  # ceil: padded to a multiple of tp
    order = _dense_order(val)
    new = []
    with graph.inserting_before(v.next):  # in order, right after v
        x = v
        if order != list(range(val.dim())):
            x = graph.call_function(aten.permute.default, (x, order))
            new.append(x)
        new.append(graph.call_function(aten.reshape.default, (x, [numel])))
        if size * tp != numel:
            new.append(graph.call_function(aten.constant_pad_nd.default,
                                           (new[-1], [0, size * tp - numel], 0.0)))
        new.append(graph.call_function(aten.slice.Tensor,
                                       (new[-1], 0, rank * size, (rank + 1) * size)))
        # named after v, so the backward's input says what it holds
        new.append(graph.create_node("call_function", aten.clone.default, (new[-1],),
                                     name=f"{v.name}_part"))
    for n in new:
        compute_val(n, mode)
    chunk = new[-1]
    chunk.meta[META_PARTITIONED] = {"of": v.name, "shape": list(val.shape), "tp": tp,
                                    "bytes": numel * val.element_size()}
    log.debug("partition_activations: %s %s saved as 1/%d", v.name, list(val.shape), tp)
    return chunk


def _gather(graph: fx.Graph, ph: fx.Node, chunk: fx.Node, val: torch.Tensor, tp: int,
            group: str, mode) -> None:
    """Replace the backward's input ``ph`` by the chunk's input, gathered whole over the TP
    group before the first use of ``ph``."""
    with graph.inserting_before(ph):
        part = graph.placeholder(chunk.name)
    part.meta.update({k: ph.meta[k] for k in ph.meta if k not in ("val", "tensor_meta")})
    part.meta["val"] = chunk.meta["val"]
    first = next(n for n in graph.nodes if n in ph.users)
    order = _dense_order(val)
    shape = [val.shape[d] for d in order]
    name = chunk.meta[META_PARTITIONED]["of"]

    def call(target, args, suffix):  # named after the value: never a forward op's name,
        # which the dump's saved.txt would list as recomputed
        new.append(graph.create_node("call_function", target, args, name=f"{name}_{suffix}"))
    new = []
    with graph.inserting_before(first):
        call(_c10d.all_gather_into_tensor.default, (part, tp, group), "gathered")
        call(_c10d.wait_tensor.default, (new[-1],), "waited")
        if val.numel() != chunk.meta["val"].numel() * tp:
            call(aten.slice.Tensor, (new[-1], 0, 0, val.numel()), "unpadded")
        call(aten.view.default, (new[-1], shape), "whole")
        if order != list(range(val.dim())):
            inverse = sorted(range(val.dim()), key=order.__getitem__)
            call(aten.permute.default, (new[-1], inverse), "strided")
    for n in new:
        compute_val(n, mode)
    ph.replace_all_uses_with(new[-1])
    graph.erase_node(ph)
