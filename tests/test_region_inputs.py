"""activation_memory_budget with checkpointed regions (passes/region_inputs.py): the regions
keep their inputs, so the backward recomputes one region at a time and its peak is lower
than torch's budget-0 partition (which recomputes the whole forward before the first
backward op). Bytes from the graphs; the values equal the plain run's."""
import pytest
import torch
from torch import fx

import zerofx
import zerofx.passes.pipeline as pipeline
from zerofx.graph_ops import TAG_GRAD
from zerofx.passes import PassSpec
from zerofx.passes.nodes import is_view
from test_checkpointing import Stack, _batch, _cfg


def backward_peak(bw: fx.GraphModule) -> int:
    """The most bytes the backward graph's own values hold at once, run in graph order: a
    value lives from its node to its last reader (a view keeps its base alive). The
    gradients it returns are left out: the same in every partition, alive to the end."""
    base, size, last = {}, {}, {}
    grads = set(bw.graph.output_node().all_input_nodes)
    for n in reversed(bw.graph.nodes):  # zerofx.tag_grad marks each gradient it hands on
        if TAG_GRAD.is_call(n) or (n in grads and is_view(n)):
            grads.add(n)
            grads.update(n.all_input_nodes)
    for i, n in enumerate(bw.graph.nodes):
        val = n.meta.get("val")
        if n.op == "call_function" and isinstance(val, torch.Tensor) and n not in grads:
            if is_view(n) and isinstance(n.args[0], fx.Node):
                base[n] = base.get(n.args[0], n.args[0])
            else:
                size[n] = val.numel() * val.element_size()
        for a in n.all_input_nodes:
            last[base.get(a, a)] = i
    live = peak = 0
    for i, n in enumerate(bw.graph.nodes):
        live += size.get(n, 0)
        peak = max(peak, live)
        live -= sum(size[a] for a in size if last.get(a) == i)
    return peak


def _recorder(seen: list):
    def record(pair, ctx):
        fw, bw = pair
        outs = fw.graph.output_node().args[0][ctx.num_fwd_outputs:]
        saved = sum(o.meta["val"].numel() * o.meta["val"].element_size() for o in outs
                    if isinstance(o, fx.Node) and o.op != "placeholder"
                    and isinstance(o.meta.get("val"), torch.Tensor))
        seen.append((saved, backward_peak(bw)))
        return pair
    return PassSpec("record_peak", record, frozenset({"partitioned"}))


def _run(budget, bf16: bool):
    torch._dynamo.reset()
    model = Stack(True, d=32, depth=4)
    cfg = {**_cfg(0), "zerofx": {"activation_memory_budget": budget}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    rt = zerofx.ZeroRuntime(model, cfg)
    seen = []
    compiled = torch.compile(model, backend="zero",
                             options={"runtime": rt, "extra_passes": (_recorder(seen),)})
    losses = []
    for k in range(2):
        loss = compiled(*_batch(k))
        loss.backward()
        rt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], seen[0]


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_budget_zero_keeps_region_inputs_and_lowers_the_backward_peak(no_torchrun_env,
                                                                      monkeypatch, bf16):
    losses, params, (saved, peak) = _run(0.0, bf16)
    ref_losses, ref_params, _ = _run(1.0, bf16)  # the default partition: regions' inputs
    with monkeypatch.context() as m:  # torch's own budget 0: the graph's inputs only
        m.setattr(pipeline, "budget_for", lambda joint, budget: budget)
        torch_losses, _, (torch_saved, torch_peak) = _run(0.0, bf16)
    if not bf16:  # fp32, the same ops recomputed: the same bits
        assert torch.equal(losses, ref_losses) and torch.equal(losses, torch_losses)
        assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    # the regions' inputs are saved: each block's input, (16, 32) fp32 at least for 3 of 4
    assert torch_saved == 0 and saved >= 3 * 16 * 32 * 4, (saved, torch_saved)
    # torch's budget 0 holds every block's recomputed hidden (16, 128) at once; here one
    # block's at a time: the peak drops by at least two blocks' hidden activations
    hidden = 16 * 128 * (2 if bf16 else 4)
    assert peak + 2 * hidden <= torch_peak, (peak, torch_peak)


def _stage3_body(rank, world):
    out = {}
    for budget in (1.0, 0.0):
        torch._dynamo.reset()
        model = Stack(True, d=32, depth=4)
        cfg = {**_cfg(3), "zerofx": {"activation_memory_budget": budget}}
        rt = zerofx.ZeroRuntime(model, cfg)
        seen = []
        compiled = torch.compile(model, backend="zero", options={
            "runtime": rt, "extra_passes": (_recorder(seen),)})
        losses = []
        for k in range(3):
            with rt.shape_carriers():
                loss = compiled(*_batch(k))
            loss.backward()
            rt.step()
            losses.append(loss.detach())
        with rt.gathered_parameters():
            out[budget] = (torch.stack(losses), [p.detach().clone() for p in
                                                 model.parameters()], seen[0][0])
    return out


@pytest.mark.slow
def test_region_inputs_at_stage_3_on_two_ranks_change_no_value():
    from multiproc import run_ranks

    for out in run_ranks(_stage3_body, 2):
        (l1, p1, _), (l0, p0, saved0) = out[1.0], out[0.0]
        assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(p0, p1))
        assert saved0 >= 3 * 16 * 32 * 4  # the blocks' inputs, not a gathered weight
