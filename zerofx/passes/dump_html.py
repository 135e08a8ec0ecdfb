"""The visual form of a graph dump: one self-contained HTML page per graph kind.

Each node is a row, coloured by the pass that added it (AOTAutograd's own nodes plain),
with its kind, dtype and shape, and the model line it came from; collectives and zerofx's
runtime ops stand out, and the rows of one bucket (a ``reduce_bucket`` and the gradients it
takes) are grouped. The plan's tables (plan.txt) and the per-pass summary sit beside it.
"""
from __future__ import annotations

import html

import torch
from torch import fx

from zerofx.fx_source import model_line
from zerofx.passes.nodes import added_by, kind_of, role_of

_PALETTE = ("#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d9f2d9", "#fce1c8",
            "#e0f4ff")


def input_names(gm: fx.GraphModule) -> dict[str, str]:
    """placeholder name -> what it is ("param fc1.weight", "input L['x']", ...)."""
    out = {}
    for n in gm.graph.nodes:
        role = role_of(n) if n.op == "placeholder" else None
        if role is not None:
            out[n.name] = f"{role.kind} {role.name}"
    return out


def _meta(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)}"
    return ""


def render_html(gm: fx.GraphModule, *, title: str, summary: str, plan: str) -> str:
    """The page for ``gm`` (the graph after the last pass that ran)."""
    names = input_names(gm)
    passes = sorted({added_by(n) for n in gm.graph.nodes if added_by(n)})
    colour = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(passes)}
    bucket_of = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and "reduce_bucket" in str(n.target):
            for a in n.all_input_nodes:
                bucket_of.setdefault(a.name, n.name)
            bucket_of[n.name] = n.name
    rows = []
    for n in gm.graph.nodes:
        kind, owner = kind_of(n), added_by(n)
        style = f"background:{colour[owner]}" if owner else ""
        strong = kind in ("collective", "zerofx_op")
        target = names.get(n.name, str(n.target) if n.op != "output" else "output")
        cells = [n.name, target, kind, _meta(n), owner or "", bucket_of.get(n.name, ""),
                 model_line(n)]
        text = "".join(f"<td>{'<b>' if strong and i < 2 else ''}{html.escape(str(c))}"
                       f"{'</b>' if strong and i < 2 else ''}</td>" for i, c in enumerate(cells))
        rows.append(f"<tr style='{style}'>{text}</tr>")
    legend = " ".join(f"<span style='background:{colour[p]};padding:2px 6px'>{html.escape(p)}"
                      f"</span>" for p in passes)
    head = "".join(f"<th>{h}</th>" for h in ("node", "op / input", "kind", "value", "added by",
                                             "bucket", "model line"))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:13px sans-serif;display:flex;gap:16px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;white-space:nowrap}}
pre{{font-size:12px;background:#f6f6f6;padding:8px}}</style></head><body>
<div><h2>{html.escape(title)}</h2><p>added by pass: {legend or 'none'}</p>
<table><tr>{head}</tr>{''.join(rows)}</table></div>
<div><h3>passes</h3><pre>{html.escape(summary)}</pre><h3>plan</h3><pre>{html.escape(plan)}</pre>
</div></body></html>
"""
