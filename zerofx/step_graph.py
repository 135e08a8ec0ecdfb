"""Build the optimizer-step graph: trace the runtime's step function, run the pipeline, dump.

The step is traced with make_fx over fake tensors (nothing runs while tracing), so its
collectives appear as functional-collective nodes and the fused update as
``torch.ops.zerofx.adam_step_``: the dump shows the whole step, and "optimizer" passes can
rewrite it like any other graph.
"""
from __future__ import annotations

from torch.fx.experimental.proxy_tensor import make_fx

from zerofx.passes import PassContext, run_pipeline
from zerofx.passes.dump import GraphDump
from zerofx.runtime.step_fn import make_step_fn, traceable


def build_step_program(rt, *, passes, dump_root: str | None, graph_id: str):
    """Trace ``rt``'s optimizer step into a GraphModule, run the passes over it, return it."""
    gm = make_fx(traceable(make_step_fn(rt)), tracing_mode="fake")(*rt.state.step_inputs().tensors())
    ctx = PassContext(rt.config, rt.plan, "optimizer", f"{graph_id}_optimizer",
                      state_id=rt.id, tp_group=rt.tp_group_name, **rt.pass_facts())
    dump = GraphDump.create(dump_root, rank=rt.plan.rank, graph=graph_id, kind="optimizer") \
        if dump_root else None
    return run_pipeline(gm, ctx, passes, dump=dump)
