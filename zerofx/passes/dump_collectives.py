"""collectives.txt of a graph dump: every collective the graph issues, what it moves, the
pass that added it, the model line it serves and its predicted time (zerofx/comm_cost.py).

    node           collective      group  elements  dtype     MiB   pred ms  added by         model line
    all_reduce     all_reduce      tp     8192      bfloat16  0.02  0.32     tensor_parallel  File "m.py", line 9 ...
    reduce_bucket  p2p_reduce      dp     30000     bfloat16  0.06  0.35     bucketing
"""
from __future__ import annotations

import re

import torch
from tabulate import tabulate
from torch import fx

from zerofx.comm_cost import DEFAULT, CommCost
from zerofx.passes.nodes import added_by, model_line

_c10d = torch.ops._c10d_functional


_ZEROFX = {"gather_bucket": "all_gather",  # stage 3: one bucket, gathered
           "finish_gather": "gather",  # the step's shards, in the chosen form
           "reduce_bucket": "reduce"}  # gradients, reduced with their bucket


def _kinds():
    kinds = {_c10d.all_reduce.default: "all_reduce",
             _c10d.all_gather_into_tensor.default: "all_gather",
             _c10d.reduce_scatter_tensor.default: "reduce_scatter"}
    # zerofx's ops exist once a runtime registered them (a plain compile has none).
    for name, kind in _ZEROFX.items():
        try:
            kinds[getattr(torch.ops.zerofx, name).default] = kind
        except AttributeError:
            continue
    return kinds


def collective_rows(gm: fx.GraphModule, *, tp_group: str | None, dp_size: int,
                    forms: dict[str, str], cost: CommCost | None) -> list[dict]:
    """One row per collective node; ``forms``: the runtime's {role: form}."""
    cost = cost or DEFAULT
    kinds, rows = _kinds(), []
    for n in gm.graph.nodes:
        kind = kinds.get(n.target) if n.op == "call_function" else None
        if kind is None:
            continue
        if kind == "reduce" and dp_size == 1:
            continue  # one data-parallel rank: the bucket is not communicated
        moved = _moved(n, grads=kind == "reduce")
        kind = _resolve(kind, forms)
        if moved is None:
            continue
        numel, dtype = moved
        nbytes = numel * dtype.itemsize
        # a functional collective names its group last; zerofx's ops use the DP group
        group = "tp" if tp_group is not None and n.target.namespace == "_c10d_functional" \
            and n.args[-1] == tp_group else "dp"
        rows.append({"node": n.name, "collective": kind, "group": group, "elements": numel,
                     "dtype": str(dtype).replace("torch.", ""),
                     "MiB": round(nbytes / 2**20, 3),
                     "pred ms": round(cost.predict_ms(kind, nbytes), 2),
                     "added by": added_by(n) or "traced", "model line": _line(n)[:80]})
    return rows


def _line(n: fx.Node) -> str:
    """The model line a collective serves (its own, or, added by a pass, its input's), as
    ``file.py:43 code``."""
    line = model_line(n) or next((model_line(a) for a in n.all_input_nodes if model_line(a)),
                                 "")
    m = re.match(r'File "(?:.*/)?([^"/]+)", line (\d+), in \S+ ?(.*)', line)
    return f"{m[1]}:{m[2]} {m[3]}" if m else line


def _resolve(kind: str, forms: dict[str, str]) -> str:
    if kind == "reduce":
        return {"p2p": "p2p_reduce", "reduce_scatter": "reduce_scatter"}.get(
            forms.get("reduce", "all_reduce"), "all_reduce")
    if kind == "gather":
        return "p2p_gather" if forms.get("gather") == "p2p" else "all_gather"
    return kind


def _moved(n: fx.Node, *, grads: bool):
    """(elements, dtype) of the whole buffer ``n`` reduces or gathers (``grads``: a
    reduce_bucket, which hands the gradients its bucket collective will reduce)."""
    if grads:
        grads = [g for g in n.args[3] if isinstance(g, fx.Node) and "val" in g.meta]
        if not grads:
            return None
        return sum(g.meta["val"].numel() for g in grads), grads[0].meta["val"].dtype
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    if n.target is _c10d.reduce_scatter_tensor.default:  # its input is the whole buffer
        return val.numel() * int(n.args[2]), val.dtype
    return val.numel(), val.dtype


def render_collectives(rows: list[dict]) -> str:
    if not rows:
        return "no collectives in this graph\n"
    total = sum(r["pred ms"] for r in rows)
    return (tabulate([list(r.values()) for r in rows], headers=list(rows[0])) +
            f"\n\n{len(rows)} collectives, {total:.2f} ms predicted if none overlapped\n")
