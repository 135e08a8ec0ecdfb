"""Per-pass graph dumps: what each pass did, on disk, for people and for `zerofx-dump`.

Layout (one directory per rank and compiled graph):

    <root>/rank0/comm_measured.txt               collectives timed while training (runtime/comm/log.py)
    <root>/rank0/<graph>/plan.txt                the layout plan the passes saw
    <root>/rank0/<graph>/<kind>/00_input.py      the graph as AOTAutograd produced it
    <root>/rank0/<graph>/<kind>/01_<pass>.py     the graph after each pass (readable code)
    <root>/rank0/<graph>/<kind>/summary.txt      table: node kinds, added/removed per pass
    <root>/rank0/<graph>/<kind>/summary.json     the same, machine-readable (zerofx-dump)
    <root>/rank0/<graph>/<kind>/graph.html       the latest graph, coloured by pass (dump_html)
    <root>/rank0/<graph>/<kind>/failure.txt      a pass that raised: which, on what, why

<graph> is Dynamo's compile id (g<frame>_<attempt>); <kind> is joint, forward, backward or
inference.
"""
from __future__ import annotations

import json
import os
import re
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tabulate import tabulate
from torch import fx

from zerofx.passes.dump_html import input_names, render_html
from zerofx.fx_source import model_line
from zerofx.passes.nodes import added_by, count_kinds

SUMMARY_JSON = "summary.json"
KINDS = ("placeholder", "compute", "view", "cast", "collective", "wait", "zerofx_op",
         "output")


@dataclass
class PassRecord:
    """One row of the summary: a pass applied to one graph."""

    step: int
    name: str
    added: int
    removed: int
    nodes: int
    ms: float
    kinds: dict[str, int]
    file: str


@dataclass
class GraphDump:
    """Writes one graph's per-pass dumps; created by the pipeline when dumping is on."""

    directory: Path
    records: list[PassRecord] = field(default_factory=list)

    @classmethod
    def create(cls, root: str | os.PathLike, *, rank: int, graph: str,
               kind: str | None = None) -> "GraphDump":
        directory = Path(root) / f"rank{rank}" / _safe(graph)
        if kind is not None:
            directory = directory / _safe(kind)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory)

    def write_text(self, name: str, text: str) -> None:
        (self.directory / name).write_text(text)

    def record(self, name: str, gm: fx.GraphModule, *, added: int, removed: int,
               ms: float) -> None:
        step = len(self.records)
        file = f"{step:02d}_{name}.py"
        self.write_text(file, _graph_code(gm, name))
        kinds = dict(count_kinds(gm.graph))
        self.records.append(PassRecord(step, name, added, removed, len(gm.graph.nodes),
                                       round(ms, 3), kinds, file))
        self._write_summary()
        plan = self.directory.parent / "plan.txt"
        self.write_text("graph.html", render_html(
            gm, title=f"{self.directory.parent.name} {self.directory.name} after {name}",
            summary=(self.directory / "summary.txt").read_text(),
            plan=plan.read_text() if plan.exists() else ""))

    def failure(self, name: str, gm: fx.GraphModule, error: BaseException) -> None:
        """Record a pass that raised, before the error propagates: the pass, the nodes the
        message names with their model lines, the traceback, the graph as the pass left it."""
        file = f"{len(self.records):02d}_{name}.failed.py"
        self.write_text(file, _graph_code(gm, f"{name} (raised)"))
        self.write_text("failure.txt", failure_text(name, gm, error, file))

    def _write_summary(self) -> None:
        rows = [asdict(r) for r in self.records]
        (self.directory / SUMMARY_JSON).write_text(json.dumps({"passes": rows}, indent=1))
        self.write_text("summary.txt", render_summary(rows) + "\n")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def render_summary(rows: list[dict]) -> str:
    """The summary table: one row per pass, node kinds after it, added/removed."""
    headers = ["#", "pass", "+added", "-removed", "nodes", *KINDS, "ms"]
    table = [[r["step"], r["name"], r["added"], r["removed"], r["nodes"],
              *(r["kinds"].get(k, 0) for k in KINDS), r["ms"]] for r in rows]
    return tabulate(table, headers=headers)


def failure_text(name: str, gm: fx.GraphModule, error: BaseException, file: str) -> str:
    message = str(error)
    named = [n for n in gm.graph.nodes
             if re.search(rf"(?<![\w]){re.escape(n.name)}(?![\w])", message)]
    lines = [f"pass {name} raised {type(error).__name__}: {message.splitlines()[0] if message else ''}",
             f"graph as the pass left it: {file}", ""]
    for n in named[:8]:
        lines.append(f"node {n.name} ({n.op} {n.target}): {model_line(n) or 'no model line'}")
    lines += ["", *traceback.format_exception(type(error), error, error.__traceback__)]
    return "\n".join(lines) + "\n"


def _graph_code(gm: fx.GraphModule, pass_name: str) -> str:
    """Readable code, with each added node's line marked by the pass that added it, and
    what each input is (``primals_3`` alone does not say it is ``fc1.weight``)."""
    lines = [f"# graph after: {pass_name}"]
    lines += [f"#   {name} = {what}" for name, what in input_names(gm).items()]
    lines.append("")
    owners = {n.name: added_by(n) for n in gm.graph.nodes if added_by(n)}
    for line in gm.print_readable(print_output=False).splitlines():
        lhs = line.strip().split(" ", 1)[0].rstrip(":")
        owner = owners.get(lhs)
        lines.append(f"{line}  # +{owner}" if owner and " = " in line else line)
    return "\n".join(lines) + "\n"
