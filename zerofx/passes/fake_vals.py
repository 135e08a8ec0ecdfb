"""Keep ``node.meta["val"]`` valid (graph rule 3) for nodes a pass adds or changes.

Partitioners, Inductor and later passes read the fake value of every node. A pass that adds
nodes need not compute them: the pipeline calls ``fill_fake_vals`` after each pass. A pass
that changes dtypes recomputes values as it goes with ``compute_val``.
"""
from __future__ import annotations

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map


def fake_mode_of(graph: fx.Graph):
    """The FakeTensorMode the graph's values were traced under (None if untraced)."""
    vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals)


def compute_val(node: fx.Node, mode) -> None:
    """(Re)compute ``node.meta["val"]`` from its inputs' fake values."""
    if mode is None or node.op != "call_function":
        return

    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args, kwargs = tree_map(val, (node.args, node.kwargs))
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def fill_fake_vals(gm: fx.GraphModule) -> int:
    """Compute ``meta["val"]`` for call_function nodes that lack it; returns how many."""
    missing = [n for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    mode = fake_mode_of(gm.graph) if missing else None
    for n in missing:
        compute_val(n, mode)
    return len(missing) if mode is not None else 0
