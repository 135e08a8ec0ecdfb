"""collectives.txt of a graph dump: every collective the graph issues, what it moves, the
pass that added it, the model line it serves and its predicted time (zerofx/comm_cost.py).

    node           collective      group  elements  dtype     MiB   pred ms  added by         model line
    all_reduce     all_reduce      tp     8192      bfloat16  0.02  0.32     tensor_parallel  File "m.py", line 9 ...
    reduce_bucket  p2p_reduce      dp     30000     bfloat16  0.06  0.35     bucketing
"""
from __future__ import annotations

import torch
from tabulate import tabulate
from torch import fx

from zerofx.comm_cost import DEFAULT, CommCost
from zerofx.fx_source import model_line, short_line
from zerofx.passes.nodes import ZEROFX_COMM, added_by, is_collective

_c10d = torch.ops._c10d_functional
# functional collectives by op name -> the kind comm_cost predicts
_FUNCOL = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
           "all_gather_into_tensor_out": "all_gather",  # passes/gather_out.py's form
           "reduce_scatter_tensor": "reduce_scatter"}


def _kind(n: fx.Node, kinds: dict[str, str]) -> str | None:
    """What ``n`` moves as comm_cost names it (reduce/gather: the kind of the runtime's
    chosen form; without a runtime, the native collective's)."""
    if not is_collective(n):
        return None
    name = n.target._opname
    kind = ZEROFX_COMM.get(name) if n.target.namespace == "zerofx" else _FUNCOL.get(name)
    if kind == "reduce":
        return kinds.get("reduce", "all_reduce")
    if kind in ("gather", "param_gather"):
        return kinds.get(kind, "all_gather")
    return kind


def collective_rows(gm: fx.GraphModule, *, tp_group: str | None, dp_size: int,
                    kinds: dict[str, str], cost: CommCost | None) -> list[dict]:
    """One row per collective node; ``kinds``: the runtime's {role: kind of its form}."""
    cost = cost or DEFAULT
    rows = []
    for n in gm.graph.nodes:
        kind = _kind(n, kinds)
        if kind is None:
            continue
        grads = n.target._opname == "reduce_bucket"
        if grads and dp_size == 1:
            continue  # one data-parallel rank: the bucket is not communicated
        moved = _moved(n, grads=grads)
        if moved is None:
            continue
        numel, dtype = moved
        nbytes = numel * dtype.itemsize
        group = _group(n, tp_group)
        rows.append({"node": n.name, "collective": kind, "group": group, "elements": numel,
                     "dtype": str(dtype).replace("torch.", ""),
                     "MiB": round(nbytes / 2**20, 3),
                     "pred ms": round(cost.predict_ms(kind, nbytes), 2),
                     "added by": added_by(n) or "traced", "model line": _line(n)[:80]})
    return rows


def _group(n: fx.Node, tp_group: str | None) -> str:
    """"tp", "world" or "dp": a functional collective names its group last (with tensor
    parallelism the step's norm all-reduce spans every rank); zerofx's ops use the DP group."""
    if n.target.namespace != "_c10d_functional" or tp_group is None:
        return "dp"
    if n.args[-1] == tp_group:
        return "tp"
    return "world" if n.args[-1] == _world_name() else "dp"


def _world_name() -> str | None:
    dist = torch.distributed
    return dist.group.WORLD.group_name if dist.is_available() and dist.is_initialized() \
        else None


def _line(n: fx.Node) -> str:
    """The model line a collective serves (its own, or, added by a pass, its input's), as
    ``file.py:43 code``."""
    line = model_line(n) or next((model_line(a) for a in n.all_input_nodes if model_line(a)),
                                 "")
    return short_line(line)


def _moved(n: fx.Node, *, grads: bool):
    """(elements, dtype) of the whole buffer ``n`` reduces or gathers (``grads``: a
    reduce_bucket, which hands the gradients its bucket collective will reduce)."""
    if grads:
        grads = [g for g in n.args[3] if isinstance(g, fx.Node) and "val" in g.meta]
        if not grads:
            return None
        return sum(g.meta["val"].numel() for g in grads), grads[0].meta["val"].dtype
    if n.target._opname == "finish_gather":  # (sid, flat, chunk, numel): fills flat in place
        flat = n.args[1].meta.get("val")
        return (n.args[3], flat.dtype) if isinstance(flat, torch.Tensor) else None
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
