"""mixed_precision pass: autocast's op policy on the joint graph, one cast per parameter."""
import pytest
import torch

from models import make
from zerofx.passes import PassSpec
from zerofx.passes.mixed_precision import FP32_OPS, LOWP_OPS
from zerofx.passes.nodes import is_cast

TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _spy_joint(store):
    """A test pass after mixed_precision that keeps the transformed joint graph."""
    def spy(gm, ctx):
        store["joint"] = gm
        return gm
    return PassSpec("spy", spy, frozenset({"joint"}), after=("mixed_precision",))


def _run(name, dtype, store=None):
    model, batch = make(name)
    key = "bf16" if dtype == torch.bfloat16 else "fp16"
    # fp16 on the plain path only without loss scaling (a static scale of 1)
    options = {"config": {key: {"enabled": True, **({"loss_scale": 1} if key == "fp16" else {})}}}
    if store is not None:
        options["extra_passes"] = [_spy_joint(store)]
    loss = torch.compile(model, backend="zero", options=options)(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _autocast_reference(name, dtype):
    model, batch = make(name)
    with torch.autocast("cpu", dtype=dtype):
        loss = model(*batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["mlp", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_autocast(name, dtype, no_torchrun_env):
    loss, grads = _run(name, dtype)
    ref_loss, ref_grads = _autocast_reference(name, dtype)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    for n, g in grads.items():
        assert g.dtype == torch.float32, n  # master gradients stay fp32
        scale = ref_grads[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(g / scale, ref_grads[n] / scale, **TOL[dtype])


def _vals(node):
    return [a.meta["val"] for a in node.args
            if hasattr(a, "meta") and isinstance(a.meta.get("val"), torch.Tensor)]


def test_op_policy_and_one_cast_per_parameter(no_torchrun_env):
    store = {}
    _run("block", torch.bfloat16, store)
    graph = store["joint"].graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    lowp = [n for n in calls if getattr(n.target, "overloadpacket", None) in LOWP_OPS]
    fp32 = [n for n in calls if getattr(n.target, "overloadpacket", None) in FP32_OPS]
    assert len(lowp) >= 12 and len(fp32) >= 6
    for n in lowp:  # matmuls, attention: compute-dtype inputs (attention's lse excepted)
        limit = LOWP_OPS[n.target.overloadpacket]
        assert all(v.dtype == torch.bfloat16 for v in _vals(n)[:limit]), n.format_node()
    for n in fp32:  # softmax, layer norm, losses, reductions: fp32 inputs
        assert all(v.dtype != torch.bfloat16 for v in _vals(n)), n.format_node()
    params = {n for n in graph.nodes if n.op == "placeholder"
              and n.meta.get("zerofx_input") and n.meta["zerofx_input"].kind == "param"}
    param_casts = [n for n in calls if n.args and n.args[0] in params
                   and is_cast(n)]
    cast_params = [n.args[0] for n in param_casts]
    assert len(cast_params) == len(set(cast_params))  # never twice
    # every parameter feeding a matmul is cast once: all but the embedding and LayerNorm affines
    assert len(cast_params) == len(params) - 5 and len(params) == 13


@pytest.mark.slow
def test_a_smaller_last_batch_recompiles_with_dynamic_shapes(no_torchrun_env):
    """The loader's last, smaller batch makes Dynamo recompile with a symbolic batch size:
    view replays (mixed_precision) and matmul forms (matmul_form) must handle symbolic
    sizes. Reference: the same model in eager fp32 under bf16 autocast."""
    import zerofx
    from models import block_batch

    model, _ = make("block")
    reference, _ = make("block")
    rt = zerofx.ZeroRuntime(model, {"bf16": {"enabled": True},
                                    "optimizer": {"type": "AdamW", "params": {"lr": 0.0}}})
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    for n in (4, 4, 3, 2):  # the second shape change makes the batch dimension symbolic
        x, y = block_batch(n=n, seed=n)
        got = compiled(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = reference(x, y)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        rt.backward(got)
        rt.step()  # lr 0: the parameters stay equal to the reference's
