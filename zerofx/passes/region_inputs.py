"""Checkpointed regions keep their inputs under an activation memory budget.

torch's min-cut partitioner under ``activation_memory_budget`` weighs every activation of
the joint graph alike, checkpointed regions' inputs included, and at budget 0 it saves the
graph's inputs only (``choose_saved_values_set``: ``if memory_budget == 0: return
node_info.inputs``). With checkpointed blocks that recomputes the whole forward at the start
of the backward graph: the head's backward needs the last block's output, which needs every
block before it, and each recomputed block's activations then stay alive until that block's
own backward. The backward's peak holds every activation at once, as without
checkpointing, plus a whole forward of recompute (measured, benchmarks/RESULTS.md "Why
zerofx's stage 3 trained less than FSDP2": 1228 MiB of activations at the backward's peak
against 777 MiB with the regions' inputs saved, GPT 12 x 768, sequence 1024).

DeepSpeed's checkpointing (and torch's default partitioner, ``cleanup_recompute_tags``)
keeps each region's inputs and recomputes one region at a time. This does the same before
the min-cut: every value a checkpointed region reads from outside it is MUST_SAVE, looking
through the casts and views zerofx's passes insert (the mixed_precision pass's fp32 copy of
a residual for a norm sits between two regions, untagged), except values computed from
graph inputs alone (a weight's cast or a stage-3 gather: recomputing them costs no
activation memory, saving them would keep a weight alive). A budget of 0 then means the
least the regions allow: ``REGION_FLOOR``, since torch's 0 skips the knapsack and with it
every MUST_SAVE.
"""
from __future__ import annotations

from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from zerofx.passes.nodes import is_cast, is_view

_RECOMPUTED = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
# The smallest budget that still runs torch's knapsack (which honours MUST_SAVE): a
# fraction of the activations' range, so 1e-6 is bytes, not megabytes.
REGION_FLOOR = 1e-6


def _recomputed(node: fx.Node) -> bool:
    return node.meta.get("recompute") in _RECOMPUTED


def _region(node: fx.Node):
    return node.meta.get("ac_graph_id") if _recomputed(node) else None


def _source(node: fx.Node) -> fx.Node:
    """``node`` seen through the casts and views a pass put between it and its reader."""
    while (is_cast(node) or is_view(node)) and isinstance(node.args[0], fx.Node) \
            and _region(node) is None:
        node = node.args[0]
    return node


def _from_inputs_only(joint: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on placeholders through no recomputable op: weights,
    their casts and gathers, constants. Forward nodes only matter; this is cheap."""
    out = set()
    for n in joint.nodes:
        if n.op == "placeholder":
            if "tangent" not in n.name:
                out.add(n)
        elif n.op == "call_function" and not _recomputed(n) and all(
                a in out for a in n.all_input_nodes) and n.all_input_nodes:
            out.add(n)
    return out


def keep_region_inputs(joint: fx.GraphModule) -> list[fx.Node]:
    """Mark every value a checkpointed region reads from outside it MUST_SAVE (see the
    module doc). Returns the marked nodes (none: the graph has no checkpointed region)."""
    graph = joint.graph
    if not any(_recomputed(n) for n in graph.nodes):
        return []
    constant = _from_inputs_only(graph)
    marked = []
    for reader in graph.nodes:
        region = _region(reader)
        if region is None:
            continue
        for arg in reader.all_input_nodes:
            if _region(arg) == region:
                continue
            src = _source(arg)
            if src.op == "placeholder" or src in constant or _region(src) == region:
                continue
            if src.meta.get("recompute") != CheckpointPolicy.MUST_SAVE:
                src.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                marked.append(src)
    return marked


def budget_for(joint: fx.GraphModule, budget: float) -> float:
    """The budget handed to torch's min-cut for ``joint``, region inputs marked first."""
    keep_region_inputs(joint)
    has_regions = any(_recomputed(n) for n in joint.graph.nodes)
    return REGION_FLOOR if budget == 0.0 and has_regions else budget
