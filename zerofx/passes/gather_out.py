"""gather_out: every functional all-gather writes into a buffer the graph allocates itself.

    before:  ag = all_gather_into_tensor(x, n, group);  w = wait_tensor(ag)
    after:   buf = empty([n * x.shape[0], *x.shape[1:]], x.dtype)      (x at least 1-d)
             ag = all_gather_into_tensor_out(x, n, group, out=buf);  w = wait_tensor(ag)

Why: torch 2.13 runs ``all_gather_into_tensor`` through the backend's *coalesced* all-gather,
and gloo's, when its two worker threads finish two such works at once, corrupts the heap
("malloc(): unaligned tcache chunk detected", or "double free or corruption"): 16 one-element
gathers in flight on 2 ranks abort a rank within a few thousand rounds, often within 250
(``benchmarks/gloo_gather_race.py``). The ``_out`` form runs the plain all-gather
(``_allgather_base``), as the eager ``dist.all_gather_into_tensor`` does, which did not fail in
60,000 such rounds. Same bytes, same wait; so the rewrite runs on every backend, and last on
each executed graph (a buffer rewrite: rule 2 of passes/README.md), after the schedule pass
placed the waits. The planner and the dumps' collective tables count the ``_out`` form as the
all-gather it is.
"""
from __future__ import annotations

import torch
from torch import fx

from zerofx.passes.context import PassContext

_c10d = torch.ops._c10d_functional
GATHER = _c10d.all_gather_into_tensor.default
GATHER_OUT = _c10d.all_gather_into_tensor_out.default
_KEPT = ("val", "stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr")


def gather_out_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rewrite each ``all_gather_into_tensor`` into its ``_out`` form on a fresh buffer."""
    for node in [n for n in gm.graph.nodes if n.target is GATHER]:
        src, group_size, group = node.args
        val = src.meta["val"]
        if val.dim() == 0:  # gloo gathers no 0-d tensor in either form: left to fail as is
            continue
        shape = [val.shape[0] * group_size, *val.shape[1:]]
        with gm.graph.inserting_before(node):
            buf = gm.graph.call_function(torch.ops.aten.empty.memory_format, (shape,),
                                         {"dtype": val.dtype, "device": val.device})
            out = gm.graph.call_function(GATHER_OUT, (src, group_size, group), {"out": buf})
        # the source line stays the gather's (dumps name the model line that caused it)
        out.meta.update({k: v for k, v in node.meta.items() if k in _KEPT})
        buf.meta["val"] = node.meta["val"]  # same shape, dtype and device as the result
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    return gm
