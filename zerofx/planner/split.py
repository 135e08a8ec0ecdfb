"""The tensor_parallel pass in the planner's trace: with ``tensor_parallel.size`` > 1 the
graphs zerofx-plan reads are one rank's split graphs, as the ranks run them (local weight
pieces, activations 1/tp where the pass splits them, its all-reduces), not the model traced
whole.

A real run's pass is given its context by the runtime (backend._context): the plan, the
runtime's id, which the graphs' ``zerofx::tp_param`` calls name, and the name of the
tensor-parallel process group its collectives run on. The planner has no runtime and no
process group, so it hands the pass the same context with two stand-ins:

    state_id   a ``Pieces`` registered in graph_ops' table: what tp_param reads of a
               runtime, a weight's local piece, here a fake tensor of the plan's local
               shape in the compute dtype, made in the model's fake mode (the traced
               forward runs on fake tensors; tp_param has no tensor input, so it is its
               real kernel that runs there and asks for the piece)
    tp_group   TRACE_GROUP, a name no process group has: the functional collectives' fake
               kernels read only their input's shape (and the group size the pass passes),
               never the group, so none is created. Faking one (torch's "fake" backend)
               would make ``dist.is_initialized()`` true while the backend compiles: its
               path without a runtime would then attach DDP's gradient averaging to the
               model; and in a process with a default group already (a job calling the
               planner) a new group is a collective every rank must join

The pass runs on the joint graph right after mixed_precision, where the runtime's pipeline
runs it; the passes that hand gradients to a runtime (param_identity, bucketing, zero3) stay
out, as in the trace without tensor parallelism. One thing of bucketing's is needed: the
backward's gradient of a split weight is its local piece, which autograd would refuse as
the whole stand-in weight's gradient; a real run's backward returns None for it (bucketing
hands it to the runtime), and so does the traced one (``hand_over``, on the backward graph,
after the planner has read the pair).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

import zerofx.graph_ops as graph_ops
from zerofx.config import Config
from zerofx.passes import PassSpec
from zerofx.passes.tensor_parallel import tensor_parallel_pass
from zerofx.plan import Plan

TRACE_GROUP = "zerofx-plan-tp"  # the tensor-parallel group's name in traced graphs


class Pieces:
    """What zerofx::tp_param reads of the state a graph names (graph_ops): the local
    pieces, as fake tensors of ``mode`` (module doc)."""

    def __init__(self, plan: Plan, device: torch.device, mode: FakeTensorMode):
        self.plan, self.device, self.mode = plan, device, mode

    def local_param(self, name: str) -> torch.Tensor:
        with self.mode:
            return torch.empty(self.plan.slot(name).shape, dtype=self.plan.compute_dtype,
                               device=self.device)


def is_split(plan: Plan) -> bool:
    """Whether ``plan`` splits any weight over a tensor-parallel group."""
    return plan.grid.tp_size > 1 and any(s.tp is not None for s in plan.params)


@contextlib.contextmanager
def split_passes(plan: Plan, config: Config, model: nn.Module, handed: set):
    """The extra passes (none, or the tensor_parallel pass and ``hand_over``) that make the
    traced graphs of ``model`` (built under a fake-tensor mode) rank ``plan.rank``'s split
    ones (module doc); ``handed`` gets the names of the split weights whose gradient the
    backward computed. The stand-in state lives for the block (graph_ops holds it
    weakly)."""
    if not is_split(plan):
        yield ()
        return
    weight = next(model.parameters())
    pieces = Pieces(plan, weight.device, weight.fake_mode)
    sid = graph_ops.register(pieces)

    def split_graph(gm, ctx):
        return tensor_parallel_pass(gm, replace(ctx, config=config, plan=plan, state_id=sid,
                                                tp_group=TRACE_GROUP))

    split = {s.name for s in plan.params if s.tp is not None}
    yield (PassSpec("tensor_parallel", split_graph, frozenset({"joint"}),
                    after=("mixed_precision",)),
           PassSpec("hand_over", lambda gm, ctx: hand_over(gm, ctx.roles, split, handed),
                    frozenset({"backward"})))
    del pieces


def hand_over(gm: fx.GraphModule, roles, split: set, handed: set) -> fx.GraphModule:
    """The gradients of the weights named in ``split`` leave the backward as None, their
    names in ``handed``; ``roles``: the forward's inputs' (the backward's outputs are their
    gradients, in order).
        before: return (mm(t, x), ...)    # [out/tp, in]: the local piece's gradient
        after:  return (None, ...)"""
    out = gm.graph.output_node()
    grads = list(out.args[0])
    for i, role in enumerate(roles[:len(grads)]):
        if role.kind == "param" and role.name in split and grads[i] is not None:
            handed.add(role.name)
            grads[i] = None
    out.args = (tuple(grads),)
    gm.recompile()
    return gm
