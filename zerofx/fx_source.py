"""Where an FX node came from in the user's code: its traced stack trace's last frame.

Read by the passes (dumps, the tensor_parallel pass's errors) and by the tensor-parallel
layout analysis (tp_discovery's reasons), which sits below the passes.
"""
from __future__ import annotations

import re

from torch import fx


def model_line(node: fx.Node) -> str:
    """The user's source line a node was traced from (the last frame of its stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    # Python 3.11+ traces underline the expression with a line of ^ and ~: not code.
    frames = [ln.strip() for ln in trace.strip().splitlines()
              if ln.strip() and set(ln.strip()) - set("^~ ")]
    files = [ln for ln in frames if ln.startswith("File ")]
    if not files:
        return ""
    at = frames.index(files[-1])
    code = frames[at + 1] if at + 1 < len(frames) and not frames[at + 1].startswith(
        "File ") else ""
    return f"{files[-1]} {code}".strip()


def short_line(line: str) -> str:
    """``File "/x/y.py", line 43, in f code`` as ``y.py:43 code`` (else ``line`` itself)."""
    m = re.match(r'File "(?:.*/)?([^"/]+)", line (\d+), in \S+ ?(.*)', line)
    return f"{m[1]}:{m[2]} {m[3]}" if m else line
