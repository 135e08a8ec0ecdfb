"""schedule: wait for each collective as late as possible, so several are in flight at once.

    before:  ag1 = all_gather(s1); w1 = wait(ag1)       (traced functional collectives wait
             ag2 = all_gather(s2); w2 = wait(ag2)        right away)
             copy_(p1, w1); copy_(p2, w2)
    after:   ag1 = all_gather(s1); ag2 = all_gather(s2)      (both in flight)
             w1 = wait(ag1); w2 = wait(ag2); copy_(p1, w1); copy_(p2, w2)

A wait moves down to just before its first user, but never past an op that might write
what its collective reads or produces. Which ops those are comes from alias analysis
(``alias_classes``): a graph of "may share storage" edges (schema-declared views and
in-place arguments, graph inputs whose traced values share a storage), whose connected
components (networkx) are the alias classes. An op that writes a class the collective
touches, an op with other side effects, or one without a schema stops the wait; copying
one gathered chunk into the parameters no longer holds back the waits of the others. On
gloo, four 4M-element all-gathers in flight take about half the time of the same bytes
gathered one at a time.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
from torch import fx

from zerofx.passes.context import PassContext

_WAIT = torch.ops._c10d_functional.wait_tensor.default
_UNKNOWN = "<input of unknown storage>"  # graph inputs without a traced value may alias


def schedule_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Sink every functional-collective wait to its first user (within write barriers)."""
    alias = alias_classes(gm.graph)
    for wait in [n for n in gm.graph.nodes if n.target is _WAIT]:
        touched = _touched(wait, alias)
        node = wait.next
        while node.op != "output" and node not in wait.users and \
                not _is_barrier(node, touched, alias):
            node = node.next
        if node is not wait.next:
            node.prepend(wait)
    return gm


def alias_classes(graph: fx.Graph) -> dict:
    """node -> alias class id: nodes in one class may share storage."""
    g = nx.Graph()
    storages: dict = {}
    for n in graph.nodes:
        g.add_node(n)
        if n.op == "placeholder":
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                key = torch.multiprocessing.reductions.StorageWeakRef(val.untyped_storage())
                g.add_edge(n, storages.setdefault(key, n))
            else:
                g.add_edge(n, _UNKNOWN)
            continue
        if n.op != "call_function":
            continue
        if n.target is operator.getitem:
            g.add_edge(n, n.args[0])  # an element of a multi-output op's result
            continue
        schema = getattr(n.target, "_schema", None)
        if schema is None:
            continue
        for arg, value in _schema_args(n, schema):
            if arg.alias_info is not None:
                for v in _nodes(value):
                    g.add_edge(n, v)  # a view of it, or it written in place and returned
    return {n: i for i, component in enumerate(nx.connected_components(g)) for n in component}


def _schema_args(node: fx.Node, schema):
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            yield arg, node.args[i]
        elif arg.name in node.kwargs:
            yield arg, node.kwargs[arg.name]


def _nodes(value) -> list:
    """The graph nodes in an argument (a node, or a list of them)."""
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, fx.Node)]
    return []


def _touched(wait: fx.Node, alias: dict) -> set:
    """The alias classes the waited collective reads or writes."""
    collective = wait.args[0]
    nodes = [collective, *collective.all_input_nodes] if isinstance(collective, fx.Node) else []
    return {alias[n] for n in nodes if n in alias}


def _is_barrier(node: fx.Node, touched: set, alias: dict) -> bool:
    if node.op != "call_function":
        return node.op == "output"
    if getattr(node.target, "namespace", None) == "_c10d_functional":
        return False  # issuing or waiting on another collective writes nothing we read
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return True
    written = {alias[v] for arg, value in _schema_args(node, schema)
               if arg.alias_info is not None and arg.alias_info.is_write
               for v in _nodes(value) if v in alias}
    if written & touched:
        return True
    # Side effects a schema does not describe (zerofx's runtime ops) stop every wait.
    return node.is_impure() and not schema.is_mutable
