"""The tensor_parallel pass on a small traced joint graph, in one process: which nodes it adds,
where, and the local shapes it leaves (the multi-rank tests run what it produces)."""
import torch
from torch._dynamo.backends.common import aot_autograd
from functorch.compile import make_boxed_func
from torch._functorch.partitioners import default_partition

import zerofx
from models import MLP, mlp_batch
from zerofx.backend import _annotate, input_roles
from zerofx.passes import PassContext
from zerofx.passes.tensor_parallel import tensor_parallel_pass
from zerofx.plan import make_plan
from zerofx.tp.layout import resolve_tp_layout
from zerofx import graph_ops

aten = torch.ops.aten


class _Shapes:
    """What zerofx.tp_param's fake kernel reads: the plan (no tensors, no process group)."""

    def __init__(self, plan):
        self.plan, self.device = plan, torch.device("cpu")


def _joint_graph(model, batch):
    captured = {}

    def backend(gm, example_inputs):
        roles = input_roles(gm, example_inputs)

        def partition(joint, inputs, **kw):
            _annotate(joint, roles, tangents=True)
            captured.update(joint=joint, roles=roles, n_fwd=kw["num_fwd_outputs"])
            return default_partition(joint, inputs, **kw)
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g),
                            bw_compiler=lambda g, _: make_boxed_func(g),
                            partition_fn=partition)(gm, example_inputs)

    torch.compile(model, backend=backend)(*batch).backward()
    return captured


def test_mlp_joint_graph_reads_pieces_and_reduces_the_row_parallel_output(no_torchrun_env):
    torch._dynamo.reset()
    model = MLP()
    cap = _joint_graph(model, mlp_batch())
    cfg = zerofx.Config.from_dict({"tensor_parallel": {"size": 2}})
    plan = make_plan(list(model.named_parameters()), cfg, rank=0, world_size=2,
                     tp_layout=resolve_tp_layout(model, cfg))
    shapes = _Shapes(plan)
    ctx = PassContext(cfg, plan, "joint", "test", num_fwd_outputs=cap["n_fwd"],
                      state_id=graph_ops.register(shapes), roles=cap["roles"], tp_group="tp")
    gm = tensor_parallel_pass(cap["joint"], ctx)
    gm.graph.lint()
    nodes = list(gm.graph.nodes)
    pieces = [n for n in nodes if n.target == torch.ops.zerofx.tp_param.default]
    assert sorted(n.args[1] for n in pieces) == ["fc1.bias", "fc1.weight", "fc2.weight"]
    reduces = [n for n in nodes if n.target == torch.ops._c10d_functional.all_reduce.default]
    # forward: fc2's output (row-parallel); backward: none, the input x needs no gradient
    assert len(reduces) == 1 and reduces[0].args[1:] == ("sum", "tp")
    mm = reduces[0].args[0]
    assert mm.target == aten.mm.default  # fc2's addmm became mm + all-reduce + bias add
    wait = next(iter(reduces[0].users))
    add = next(iter(wait.users))
    assert add.target == aten.add.Tensor and add.args[1].meta["val"].shape == (8,)
    assert nodes.index(mm) < nodes.index(reduces[0]) < nodes.index(wait) < nodes.index(add)
    # local shapes: fc1's output is half its features; fc2's output and the loss are whole
    fc1_out = next(n for n in nodes if n.target == aten.addmm.default)
    assert tuple(fc1_out.meta["val"].shape) == (8, 16)
    assert tuple(mm.meta["val"].shape) == (8, 8)
    grads = list(gm.graph.output_node().args[0])[cap["n_fwd"]:]
    shapes_out = {tuple(g.meta["val"].shape) for g in grads if isinstance(g, torch.fx.Node)}
    assert {(16, 16), (16,), (8, 16), (8,)} <= shapes_out  # each gradient is its piece's
