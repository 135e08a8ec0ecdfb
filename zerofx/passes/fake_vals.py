"""Keep ``node.meta["val"]`` valid (graph rule 4) for nodes a pass adds or changes.

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


# What a value was computed from (compute_val): (inputs_key, the value). The check after a
# pass (stale_fake_vals) recomputes a value only where this no longer holds, which halves the
# fake-tensor work of a pass that rewrites every node (tensor parallelism).
_FROM = "zerofx_val_from"


def compute_val(node: fx.Node, mode) -> None:
    """(Re)compute ``node.meta["val"]`` from its inputs' fake values."""
    if mode is None or node.op != "call_function":
        return

    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args, kwargs = tree_map(val, (node.args, node.kwargs))
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)
    node.meta[_FROM] = (_inputs_key(node), node.meta["val"])


def _inputs_key(node: fx.Node):
    """What ``val_summary`` of a node's value depends on: its op, its constants, and the name,
    dtype and shape of each input node's value."""
    def key(a):
        return (a.name, val_summary(a.meta.get("val"))) if isinstance(a, fx.Node) else a
    return node.target, tree_map(key, (node.args, node.kwargs))


def _still_from_inputs(node: fx.Node) -> bool:
    """The node's value is the one compute_val gave it, and its inputs are as they were."""
    memo = node.meta.get(_FROM)
    if memo is None or memo[1] is not node.meta.get("val"):
        return False
    try:
        return bool(memo[0] == _inputs_key(node))
    except RuntimeError:  # a tensor constant replaced by another: ambiguous equality
        return False


def forget_inputs(gm: fx.GraphModule) -> None:
    """Drop compute_val's records (they name nodes of this graph: none may outlive it in a
    copy of its meta)."""
    for n in gm.graph.nodes:
        n.meta.pop(_FROM, None)


def fill_fake_vals(gm: fx.GraphModule) -> int:
    """Compute ``meta["val"]`` for call_function nodes that lack it; returns how many."""
    missing = [n for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    mode = fake_mode_of(gm.graph) if missing else None
    for n in missing:
        compute_val(n, mode)
    return len(missing) if mode is not None else 0


def val_summary(v):
    """What later passes rely on of a fake value: dtype and shape of every tensor in it."""
    if isinstance(v, torch.Tensor):
        return (v.dtype, tuple(str(d) for d in v.shape))
    if isinstance(v, (tuple, list)):
        return tuple(val_summary(x) for x in v)
    return None


def stale_fake_vals(gm: fx.GraphModule, nodes) -> list[str]:
    """Of ``nodes`` (the ones a pass added or rewrote), those whose ``meta["val"]`` is missing
    or disagrees with what their inputs now compute (a pass changed an input's dtype and
    left the old value): one line each. Checked right after the pass, so the error names the
    pass that broke graph rule 4, not the later pass that trips on it."""
    mode = fake_mode_of(gm.graph)
    if mode is None:
        return []
    bad = []
    for node in nodes:
        if node.op != "call_function":
            continue
        if "val" not in node.meta:
            bad.append(f"{node.name} ({node.target}) has no fake value")
            continue
        if _still_from_inputs(node):  # recomputing would give the same dtypes and shapes
            continue
        have = node.meta["val"]
        try:
            compute_val(node, mode)
        except Exception as e:  # noqa: BLE001 - reported with the node that cannot run
            bad.append(f"{node.name} ({node.target}) no longer runs on its inputs: "
                       f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            node.meta["val"] = have
            continue
        now, node.meta["val"] = node.meta["val"], have
        if val_summary(now) != val_summary(have):
            bad.append(f"{node.name} ({node.target}) carries {val_summary(have)} but computes "
                       f"{val_summary(now)}")
        else:  # the value kept agrees with these inputs: the next check may skip it
            node.meta[_FROM] = (node.meta[_FROM][0], have)
    return bad
