"""What the traced graphs of one training micro-step hold and compute, per forward/backward
pair, read from the partitioned graphs on fake tensors (``node.meta["val"]``: shapes and
dtypes, no storage).

    saved      bytes the forward saves for its backward: each storage once (a value and its
               views share one); parameters and their views hold no memory of their own
    fw_peak    the most bytes alive while the forward runs: its non-parameter inputs (values
               an earlier graph made), then each value from the node that makes it to its
               last reader (torch.fx's generated code drops a value after its last use),
               outputs (saved values and what the caller gets) to the end
    bw_peak    the same over the backward, from its inputs (the saved values, each storage
               once, and the incoming gradients), each freed after its last reader (the
               compiled backward takes its inputs boxed and drops them so); a parameter's
               gradient lives until the last gradient of its bucket is made (zerofx's
               bucketing copies a bucket into the gradient buffer then)
    flops      matmul/convolution/attention FLOPs of each graph, by torch's own formulas
               (torch.utils.flop_counter's registry, called on the nodes' fake values); the
               backward's include what it recomputes (checkpointing, the budget)
    moved      bytes every other op reads and writes (inputs + outputs; a lookup, the rows
               it reads): the memory traffic that bounds elementwise, normalisation and
               reduction ops
    fw_ops     each op of the graph as (class, dtype, amount), what step_time.py prices:
    bw_ops     the class (planner/rates.py: matmul, attention, copy, cast, arith,
               transcendental, reduction, softmax, norm, index, scatter; "view" for views
               and ops that move nothing, priced by their dispatch alone), the dtype of its
               first output, and its FLOPs (matmul, attention) or counted bytes (the others)
    partitionable  (elements, bytes per element) of each saved value that
               activation_checkpointing.partition_activations keeps as 1/tp per rank, by
               the pass's own rules (passes/partition_activations.py: a floating
               activation the forward computed, replicated across the TP group as the
               tensor_parallel pass recorded it, read by a recompute in the backward, not
               a model output) on the split graphs (planner/split.py); none where the TP
               pass split nothing, as the pass then cuts nothing. The pass itself, which
               needs a runtime, does not run in the planner: ``partitioned`` applies them
    nodes      the nodes of the forward and the backward graph: what the compiled graphs'
               resident objects grow with (planner/memory.py, ``compiled``)
    collectives  (kind, bytes) of each collective the graphs run themselves, forward and
               backward: the tensor_parallel pass's all-reduces (all-gathers and
               reduce-scatters with sequence parallelism) over the TP group, priced by
               step_time.py as collectives; in fw_ops/bw_ops they and their waits are
               "view" (dispatch only), not memory traffic
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
from torch import fx
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

from zerofx.graph_ops import TP_PARAM
from zerofx.passes.nodes import is_cast, is_view, is_wait, role_of
from zerofx.passes.partition_activations import is_partitionable, is_recomputed
from zerofx.planner.rates import counted_bytes, op_class

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
_NO_MEMORY = ("param", "buffer")  # graph inputs that live in the model states
_FLOP_CLASSES = ("matmul", "attention", "attention_bw")  # priced by FLOPs, not bytes
# ops that move no bytes of their own (views are handled by is_view)
_FREE = {operator.getitem, aten.empty.memory_format, aten.scalar_tensor.default,
         aten.detach.default, aten.alias.default, TP_PARAM.target, _c10d.wait_tensor.default}
# the graphs' own collectives (functional, over the TP group) -> comm_cost's kind; the
# buffer priced is the whole one reduced or gathered (comm_cost.predict_ms)
_COLLECTIVES = {_c10d.all_reduce.default: "all_reduce",
                _c10d.all_gather_into_tensor.default: "all_gather",
                _c10d.all_gather_into_tensor_out.default: "all_gather",  # gather_out's
                _c10d.reduce_scatter_tensor.default: "reduce_scatter"}
# CPU's attention kernels take the arguments of the CUDA ones torch's registry counts
_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
          aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop}


@dataclass(frozen=True)
class GraphFacts:
    """One forward/backward pair's memory and work (see the module doc)."""

    saved: int
    fw_peak: int
    bw_peak: int
    fw_flops: int
    bw_flops: int
    fw_moved: int
    bw_moved: int
    fw_ops: tuple = ()
    bw_ops: tuple = ()
    partitionable: tuple = ()
    nodes: int = 0
    collectives: tuple = ()


def graph_facts(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, roles,
                bucket_of) -> GraphFacts:
    """The facts of one partitioned pair. ``roles``: the forward's InputRoles, in order (the
    backward's outputs are their gradients); ``bucket_of(name)``: a parameter's bucket."""
    owners = [_storage_owner(o) if isinstance(o, fx.Node) else None
              for o in fw.graph.output_node().args[0][num_fwd_outputs:]]
    fw_sizes = {o: _bytes(o) for o in owners if o is not None and _holds_memory(o)}
    saved = sum(fw_sizes.values())
    fw_peak = _peak(fw, initial=_input_bytes(fw))
    # the backward's inputs: the saved values (keyed by their forward storage, so views of
    # one storage count once), then the incoming gradients
    key, sizes = {}, {}
    for i, n in enumerate(n for n in bw.graph.nodes if n.op == "placeholder"):
        k = key[n] = owners[i] if i < len(owners) else n
        if k is not None:
            sizes[k] = fw_sizes.get(k, 0) if i < len(owners) else _bytes(n)
    release = _grad_release(bw, roles, bucket_of)
    bw_peak = _peak(bw, inputs=(key, sizes), release=release)
    fw_ops, bw_ops = op_work(fw), op_work(bw)
    return GraphFacts(saved, fw_peak, bw_peak, _flops(fw_ops), _flops(bw_ops),
                      _moved(fw_ops), _moved(bw_ops), fw_ops, bw_ops,
                      _partitionable(fw, bw, num_fwd_outputs),
                      len(fw.graph.nodes) + len(bw.graph.nodes),
                      collectives(fw) + collectives(bw))


def _partitionable(fw: fx.GraphModule, bw: fx.GraphModule, n_fwd: int) -> tuple:
    """The saved values partition_activations would cut (module doc), as the pass picks
    them: by name between the graphs, each once, a model output never; only a value that
    owns its storage (cutting a view frees nothing the planner counts; a collective's
    wait holds the collective's buffer)."""
    outs = list(fw.graph.output_node().args[0])
    inputs = {n.name: n for n in bw.graph.nodes if n.op == "placeholder"}
    kept, out = set(outs[:n_fwd]), []
    for v in outs[n_fwd:]:
        if not isinstance(v, fx.Node) or v in kept or v.name not in inputs or \
                (_storage_owner(v) is not v and not is_wait(v)):
            continue
        if not any(is_recomputed(u) for u in inputs[v.name].users):
            continue
        kept.add(v)
        if is_partitionable(v):
            val = v.meta["val"]
            out.append((int(val.numel()), val.element_size()))
    return tuple(out)


def partitioned(g: GraphFacts, tp: int) -> GraphFacts:
    """``g`` with its partitionable values kept as 1/tp (padded to a multiple of tp, as the
    pass pads): fewer saved bytes, and the forward's and backward's peaks lower by as
    much, but for the largest such value held whole (the forward makes it whole before the
    cut; the backward gathers it whole before its recompute, one region at a time)."""
    if tp < 2 or not g.partitionable:
        return g
    cut = sum((n - -(-n // tp)) * item for n, item in g.partitionable)
    whole = max(n * item for n, item in g.partitionable)
    return replace(g, saved=g.saved - cut, fw_peak=min(g.fw_peak, g.fw_peak - cut + whole),
                   bw_peak=min(g.bw_peak, g.bw_peak - cut + whole))


def saved_activation_bytes(fw: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Bytes the forward graph saves for its backward (see the module doc)."""
    owners = {_storage_owner(o) for o in fw.graph.output_node().args[0][num_fwd_outputs:]
              if isinstance(o, fx.Node)}
    return sum(_bytes(o) for o in owners if _holds_memory(o))


def _holds_memory(node: fx.Node) -> bool:
    """Not a parameter or buffer (nor a view of one: the owner is asked); a split weight's
    local piece (zerofx::tp_param) is a view of the runtime's parameters."""
    if node.op != "placeholder":
        return not _is_weight_piece(node)
    role = role_of(node)
    return role is not None and role.kind not in _NO_MEMORY


def _is_weight_piece(node: fx.Node) -> bool:
    return TP_PARAM.is_call(node)


def _storage_owner(node: fx.Node) -> fx.Node:
    """The node whose output storage ``node`` views (itself when it owns one); a
    collective's wait returns the collective's own output."""
    while node.op == "call_function" and (is_view(node) and not is_cast(node) or
                                          is_wait(node)):
        node = node.all_input_nodes[0]
    return node


def _bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return int(val.numel() * val.element_size())
    return 0


def _input_bytes(g: fx.GraphModule) -> int:
    return sum(_bytes(n) for n in g.graph.nodes if n.op == "placeholder" and _holds_memory(n))


def _peak(g: fx.GraphModule, *, initial: int = 0, inputs=None, release=None) -> int:
    """The most bytes alive at once while ``g`` runs its nodes in order (module doc).
    ``initial``: bytes alive throughout; ``inputs``: (placeholder -> storage key, key ->
    bytes) of inputs freed after their last reader; ``release``: storage -> the position
    it is freed at instead. Outputs live to the end."""
    nodes = list(g.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    out, end = g.graph.output_node(), len(nodes)
    key = {}  # node -> the storage it belongs to (None: alive throughout, or no tensor)
    for n in nodes:
        if n.op == "placeholder":
            key[n] = inputs[0][n] if inputs else None
        elif n.op == "call_function":
            owner = _storage_owner(n)
            outside = owner.op == "placeholder" or _is_weight_piece(owner)
            key[n] = key.get(owner) if outside else owner
    free_at: dict = {}
    for n in nodes:
        k = key.get(n)
        if k is None:
            continue
        free_at.setdefault(k, pos.get(k, 0))  # made (or handed in) and never read: at once
        for user in n.users:
            free_at[k] = max(free_at[k], end if user is out else pos[user])
    for k, at in (release or {}).items():
        if k in free_at:
            free_at[k] = at
    frees: dict[int, list] = {}
    for k, at in free_at.items():
        frees.setdefault(at, []).append(k)
    size = dict(inputs[1]) if inputs else {}
    live = initial + sum(size.values())
    peak = live
    for i, n in enumerate(nodes):
        if n.op == "call_function" and key.get(n) is n:
            size[n] = _bytes(n)
            live += size[n]
        peak = max(peak, live)
        for k in frees.pop(i, ()):
            live -= size.get(k, 0)
    return peak


def _grad_release(bw: fx.GraphModule, roles, bucket_of) -> dict:
    """Parameter gradient -> the node position its bucket completes at (module doc)."""
    grads = bw.graph.output_node().args[0]
    pos = {n: i for i, n in enumerate(bw.graph.nodes)}
    by_bucket: dict[int, list] = {}
    for role, g in zip(roles, grads):
        if isinstance(g, fx.Node) and role is not None and role.kind == "param":
            b = bucket_of(role.name)
            if b is not None:
                by_bucket.setdefault(b, []).append(_storage_owner(g))
    release = {}
    for owners in by_bucket.values():
        done = max(pos[o] for o in owners)
        release.update({o: done for o in owners if o.op != "placeholder"})
    return release


def _flops(ops: tuple) -> int:
    return sum(amount for cls, _, amount in ops if cls in _FLOP_CLASSES)


def _flop_formula(node: fx.Node):
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    packet = target.overloadpacket
    return flop_registry.get(packet) or _FLOPS.get(packet)


def _moved(ops: tuple) -> int:
    return sum(amount for cls, _, amount in ops if cls not in _FLOP_CLASSES + ("view",))


def op_work(g: fx.GraphModule) -> tuple:
    """(class, dtype, FLOPs or counted bytes) of each op ``g`` runs (module doc); Python's
    getitem on a multi-output op's result is no op."""
    out = []
    for n in g.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        outs = _tensors(n.meta.get("val"))
        dtype = outs[0].dtype if outs else None
        fn = _flop_formula(n)
        if n.target in _FREE or n.target in _COLLECTIVES or (is_view(n) and not is_cast(n)):
            out.append(("view", dtype, 0))
            continue
        cls = op_class(n, has_flops=fn is not None)
        if fn is not None:
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta.get("val"))
            amount = int(fn(*args, **kwargs, out_val=n.meta.get("val")))
            dtype = next((a.dtype for a in _tensors(args) if a.dtype.is_floating_point), dtype)
        else:
            ins = [t for a in n.all_input_nodes for t in _tensors(a.meta.get("val"))]
            amount = counted_bytes(cls, outs, ins)
        out.append((cls, dtype, amount))
    return tuple(out)


def collectives(g: fx.GraphModule) -> tuple:
    """(comm_cost kind, bytes of the whole buffer) of each collective ``g`` runs."""
    out = []
    for n in g.graph.nodes:
        kind = _COLLECTIVES.get(n.target) if n.op == "call_function" else None
        if kind is not None:
            whole = n if kind == "all_gather" else n.args[0]  # the gathered output
            out.append((kind, _bytes(whole)))
    return tuple(out)


def _tensors(val) -> list:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (tuple, list)):
        return [t for v in val for t in _tensors(v)]
    return []
