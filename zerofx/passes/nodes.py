"""Node predicates and bookkeeping shared by the passes and the pipeline."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

# node.meta keys: constants, so passes never invent their own spellings.
META_PASS = "zerofx"  # {"pass": name} on every node a pass adds
META_INPUT = "zerofx_input"  # InputRole on placeholders
# tensor_parallel's sharding of each value it saw (None: the same on every TP rank)
META_TP_SHARDING = "zerofx_tp_sharding"
# partition_activations: on a forward's saved chunk, what it is 1/tp of (the dump reads it)
META_PARTITIONED = "zerofx_partitioned"



@dataclass(frozen=True)
class InputRole:
    """What a graph input is: a parameter, buffer, user input or incoming gradient."""

    kind: str  # "param" | "buffer" | "input" | "tangent"
    name: str


def role_of(node: fx.Node) -> InputRole | None:
    return node.meta.get(META_INPUT)


_CAST_TARGETS = {
    aten._to_copy.default,
    torch.ops.prims.convert_element_type.default,
}
_VIEW_TARGETS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.squeeze.dim,
    aten.unsqueeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
    aten.detach.default, aten.split.Tensor, aten.split_with_sizes.default,
}


def cast_node(graph: fx.Graph, value: fx.Node, dtype: torch.dtype) -> fx.Node:
    """A dtype cast the passes insert: aten._to_copy, whose C++ kernel costs ~15 us a call
    where prims.convert_element_type (a Python implementation) costs ~130 us; a step of the
    16.8M-parameter benchmark model runs ~180 of them."""
    return graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})


def is_cast(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CAST_TARGETS


def is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _VIEW_TARGETS


# zerofx's ops that move bytes between ranks -> what they do (each is one row of the dump's
# collectives.txt; start_gather is the first half of finish_gather's exchange)
ZEROFX_COMM = {"gather_bucket": "param_gather",  # stage 3: one bucket, in the form chosen
               "finish_gather": "gather",  # the step's shards, in the form chosen
               "reduce_bucket": "reduce"}  # gradients, reduced with their bucket


def is_collective(node: fx.Node) -> bool:
    """A functional collective (not its wait) or one of zerofx's communicating ops: what the
    dump's collectives.txt lists, one row each."""
    if node.op != "call_function":
        return False
    ns = getattr(node.target, "namespace", None)
    if ns in ("_c10d_functional", "c10d_functional"):
        return not is_wait(node)
    return ns == "zerofx" and node.target._opname in ZEROFX_COMM


def is_wait(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "_opname", None) == "wait_tensor"


def kind_of(node: fx.Node) -> str:
    """A coarse category for summaries: what a person wants to count in a graph."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if is_collective(node):
        return "collective"
    if is_wait(node):
        return "wait"
    if is_cast(node):
        return "cast"
    if is_view(node):
        return "view"
    if node.op == "call_function" and getattr(node.target, "namespace", None) == "zerofx":
        return "zerofx_op"
    return "compute"


def count_kinds(graph: fx.Graph) -> Counter:
    return Counter(kind_of(n) for n in graph.nodes)


def added_by(node: fx.Node) -> str | None:
    """The pass that added ``node``, or None for nodes AOTAutograd traced."""
    return node.meta.get(META_PASS, {}).get("pass")


def tag_new_nodes(graph: fx.Graph, before: set[fx.Node], pass_name: str) -> list[fx.Node]:
    """Attribute every node not in ``before`` to ``pass_name`` (graph rule 4)."""
    new = [n for n in graph.nodes if n not in before]
    for n in new:
        n.meta.setdefault(META_PASS, {"pass": pass_name})
    return new
