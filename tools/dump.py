"""zerofx-dump: render a graph dump directory (ZEROFX_DUMP=<dir>) for a person.

    zerofx-dump DIR                       every graph: plan (with the collective forms timed),
                                          per-pass listing, summary table, collectives; then
                                          each rank's collectives measured while training
    zerofx-dump DIR --rank 0 --kind backward
    zerofx-dump DIR --graph g0_0 --kind joint --show mixed_precision   the graph after a pass
    zerofx-dump DIR --graph g0_0 --kind joint --diff mixed_precision   what that pass changed
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from zerofx.passes.dump import SUMMARY_JSON, render_summary


class DumpError(Exception):
    """A dump directory that cannot be read as asked; the message says what to do."""


def find_graphs(root: Path, *, rank=None, graph=None, kind=None) -> list[Path]:
    """Directories holding one graph kind's dump, filtered, in a stable order."""
    if not root.is_dir():
        raise DumpError(f"{root}: no such directory; run with ZEROFX_DUMP={root} first")
    found = sorted(p.parent for p in root.glob(f"rank*/*/*/{SUMMARY_JSON}"))
    keep = [d for d in found
            if (rank is None or d.parent.parent.name == f"rank{rank}")
            and (graph is None or d.parent.name == graph)
            and (kind is None or d.name == kind)]
    if not keep:
        have = sorted({f"{d.parent.parent.name}/{d.parent.name}/{d.name}" for d in found})
        raise DumpError(f"{root}: no graph dump matches rank={rank} graph={graph} kind={kind}"
                        f"; present: {', '.join(have) or 'none (is this a zerofx dump?)'}")
    return keep


def load_rows(directory: Path) -> list[dict]:
    try:
        return json.loads((directory / SUMMARY_JSON).read_text())["passes"]
    except (OSError, ValueError, KeyError) as e:
        raise DumpError(f"{directory / SUMMARY_JSON}: unreadable summary ({e})") from None


def render_graph(directory: Path) -> str:
    """Per-pass listing, the summary table and the collectives of one graph kind."""
    rows = load_rows(directory)
    title = f"== {directory.parent.parent.name} / {directory.parent.name} / {directory.name}"
    listing = [f"  {r['step']:>2}  {r['name']:<24} +{r['added']:<4} -{r['removed']:<4} "
               f"-> {r['nodes']} nodes  ({r['file']})" for r in rows]
    comms = directory / "collectives.txt"
    collectives = ["", "collectives (predicted times: zerofx/comm_cost.py):",
                   comms.read_text()] if comms.exists() else []
    return "\n".join([title, *listing, "", render_summary(rows), *collectives, ""])


def pass_file(directory: Path, name: str, *, before: bool = False) -> Path:
    rows = load_rows(directory)
    idx = next((i for i, r in enumerate(rows) if r["name"] == name), None)
    if idx is None:
        raise DumpError(f"{directory}: no pass {name!r} ran here; passes: "
                        f"{', '.join(r['name'] for r in rows)}")
    if before and idx == 0:
        raise DumpError(f"{name!r} is the input graph; nothing ran before it")
    return directory / rows[idx - 1 if before else idx]["file"]


def render_diff(directory: Path, name: str) -> str:
    a, b = pass_file(directory, name, before=True), pass_file(directory, name)
    return "".join(difflib.unified_diff(a.read_text().splitlines(True),
                                        b.read_text().splitlines(True), a.name, b.name))


def render(args) -> str:
    root = Path(args.dir)
    dirs = find_graphs(root, rank=args.rank, graph=args.graph, kind=args.kind)
    out, plans_shown = [], set()
    for d in dirs:
        if args.show:
            out.append(pass_file(d, args.show).read_text())
        elif args.diff:
            out.append(render_diff(d, args.diff))
        else:
            for name in ("graph.txt", "plan.txt"):
                extra = d.parent / name
                if extra.exists() and extra not in plans_shown:
                    plans_shown.add(extra)
                    out.append(extra.read_text())
            out.append(render_graph(d))
    if not (args.show or args.diff or args.graph or args.kind):  # each rank's measured times
        for measured in sorted({d.parent.parent / "comm_measured.txt" for d in dirs}):
            if measured.exists():
                out.append(f"== {measured.parent.name} / collectives measured while training\n"
                           + measured.read_text())
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="zerofx-dump", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="the dump directory (what ZEROFX_DUMP named)")
    p.add_argument("--rank", type=int, help="only this rank")
    p.add_argument("--graph", help="only this compiled graph (e.g. g0_0)")
    p.add_argument("--kind", choices=["joint", "forward", "backward", "inference", "optimizer"])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--show", metavar="PASS", help="print the graph after PASS")
    which.add_argument("--diff", metavar="PASS", help="print what PASS changed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(render(args))
    except DumpError as e:
        print(f"zerofx-dump: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
