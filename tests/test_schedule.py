"""The schedule pass on small hand-built graphs: waits sink to their first user, never past a
mutation (multi-rank behaviour: test_zero's step-graph order test and the benchmarks)."""
import torch
from torch import fx

from zerofx.passes.schedule import schedule_pass

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


def _gathers(mutate_between: bool) -> fx.GraphModule:
    """ag1, w1, [copy_ into the second source], ag2, w2, then both results copied out."""
    g = fx.Graph()
    src1, src2, dst = g.placeholder("src1"), g.placeholder("src2"), g.placeholder("dst")
    ag1 = g.call_function(c10d.all_gather_into_tensor.default, (src1, 2, "group"))
    w1 = g.call_function(c10d.wait_tensor.default, (ag1,))
    if mutate_between:
        g.call_function(aten.copy_.default, (src2, src1))
    ag2 = g.call_function(c10d.all_gather_into_tensor.default, (src2, 2, "group"))
    w2 = g.call_function(c10d.wait_tensor.default, (ag2,))
    out1 = g.call_function(aten.copy_.default, (dst, w1))
    out2 = g.call_function(aten.copy_.default, (dst, w2))
    g.output((out1, out2))
    return fx.GraphModule(torch.nn.Module(), g)


def _order(gm):
    return [str(n.target).split(".")[-2] if n.op == "call_function" else n.op
            for n in gm.graph.nodes]


def test_waits_move_after_the_next_collective():
    gm = schedule_pass(_gathers(False), ctx=None)
    gm.graph.lint()
    # both gathers in flight before either wait; w2 stops at the first copy_ (a mutation)
    assert _order(gm) == ["placeholder"] * 3 + [
        "all_gather_into_tensor", "all_gather_into_tensor",
        "wait_tensor", "wait_tensor", "copy_", "copy_", "output"]


def test_a_mutation_is_a_barrier():
    gm = schedule_pass(_gathers(True), ctx=None)
    gm.graph.lint()
    # w1 stays before the copy_ that writes the second gather's source
    assert _order(gm) == ["placeholder"] * 3 + [
        "all_gather_into_tensor", "wait_tensor", "copy_",
        "all_gather_into_tensor", "wait_tensor", "copy_", "copy_", "output"]


def _with_values(gm, dst_aliases_src2: bool):
    """Traced values on the inputs: distinct storages, or dst a view of src2's storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    src1, src2 = torch.zeros(4), torch.zeros(8)
    dst = src2[:4] if dst_aliases_src2 else torch.zeros(4)
    vals = dict(zip(("src1", "src2", "dst"), (mode.from_tensor(t) for t in (src1, src2, dst))))
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            n.meta["val"] = vals[n.target]
    return gm


def test_alias_analysis_lets_waits_pass_writes_elsewhere():
    gm = schedule_pass(_with_values(_gathers(False), dst_aliases_src2=False), ctx=None)
    gm.graph.lint()
    # copy_(dst, w1) writes nothing the second gather reads: w2 waits only before its user
    assert _order(gm) == ["placeholder"] * 3 + [
        "all_gather_into_tensor", "all_gather_into_tensor",
        "wait_tensor", "copy_", "wait_tensor", "copy_", "output"]


def test_a_write_into_a_view_of_the_gathered_source_is_a_barrier():
    gm = schedule_pass(_with_values(_gathers(False), dst_aliases_src2=True), ctx=None)
    gm.graph.lint()
    assert _order(gm) == ["placeholder"] * 3 + [
        "all_gather_into_tensor", "all_gather_into_tensor",
        "wait_tensor", "wait_tensor", "copy_", "copy_", "output"]
