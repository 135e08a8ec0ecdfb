"""The pass pipeline: declared order, disable_passes, tagging, fake values, lint."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch import fx

from zerofx import Config, ConfigError
from zerofx.passes import PassContext, PassSpec, build_pipeline, check_order, run_pipeline
from zerofx.passes.nodes import META_PASS, added_by
from zerofx.plan import make_plan

aten = torch.ops.aten


def _traced():
    """A small aten graph with fake values, as AOTAutograd hands the passes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        return torch.relu(x @ w).sum()

    with FakeTensorMode() as mode:
        gm = make_fx(f)(torch.randn(4, 3), torch.randn(3, 2))
    return gm, mode


def _ctx(cfg=None):
    cfg = cfg or Config()
    return PassContext(cfg, make_plan([], cfg), "forward", "test")


def _double_relu_input(gm, ctx):
    """Test pass: relu(x) -> relu(x * 2); adds exactly one node."""
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    with gm.graph.inserting_before(relu):
        mul = gm.graph.call_function(aten.mul.Tensor, (relu.args[0], 2))
    relu.replace_input_with(relu.args[0], mul)
    return gm


DOUBLE = PassSpec("double", _double_relu_input, frozenset({"forward"}))


def test_new_nodes_are_tagged_and_get_fake_values():
    gm, _ = _traced()
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    gm = run_pipeline(gm, _ctx(), (DOUBLE,))
    added = [n for n in gm.graph.nodes if added_by(n)]
    assert [n.target for n in added] == [aten.mul.Tensor]
    assert added[0].meta[META_PASS] == {"pass": "double"}
    assert added[0].meta["val"].shape == (4, 2)
    torch.testing.assert_close(gm(x, w), torch.relu(2 * (x @ w)).sum())


def test_pass_skipped_on_other_graph_kinds():
    gm, _ = _traced()
    ctx = PassContext(Config(), make_plan([], Config()), "backward", "test")
    gm = run_pipeline(gm, ctx, (DOUBLE,))
    assert not any(added_by(n) for n in gm.graph.nodes)


def test_broken_graph_fails_lint():
    def use_before_def(gm, ctx):
        first = next(n for n in gm.graph.nodes if n.op == "call_function")
        last = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
        first.args = (last, *first.args[1:])
        return gm

    gm, _ = _traced()
    with pytest.raises(RuntimeError, match="used before"):
        run_pipeline(gm, _ctx(), (PassSpec("broken", use_before_def, frozenset({"forward"})),))


def test_a_stale_fake_value_is_blamed_on_the_pass_that_left_it():
    """Graph rule 3 is checked after each pass: a pass that changes a node's input dtype
    and keeps the old fake value is named, not the later pass that would read it (the
    matmul-form rewrite once left a cast without a value and a later matmul tripped)."""
    def stale_cast(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        with gm.graph.inserting_before(node):
            half = gm.graph.call_function(torch.ops.aten._to_copy.default, (node.args[0],),
                                          {"dtype": torch.bfloat16})
        half.meta["val"] = node.args[0].meta["val"]  # wrong: still the fp32 value
        node.args = (half, *node.args[1:])
        return gm

    with FakeTensorMode():
        gm = make_fx(lambda x: (x * 2).sum())(torch.empty(4, 4))
    with pytest.raises(RuntimeError, match=r"pass 'stale' left 1 node.*_to_copy.*bfloat16"):
        run_pipeline(gm, _ctx(), (PassSpec("stale", stale_cast, frozenset({"forward"})),))


def _cast_input_after_computing(how):
    """A pass that gives ``mul`` its value through compute_val, then changes what it was
    computed from (``how``): the check after the pass must see it."""
    from zerofx.passes.fake_vals import compute_val, fake_mode_of

    def bad(gm, ctx):
        mode = fake_mode_of(gm.graph)
        mul = next(n for n in gm.graph.nodes if n.target == aten.mul.Tensor)
        compute_val(mul, mode)  # fp32, from its fp32 input
        x = mul.args[0]
        if how == "rewire":  # the input becomes a bf16 cast: mul's args change
            with gm.graph.inserting_before(mul):
                half = gm.graph.call_function(aten._to_copy.default, (x,),
                                              {"dtype": torch.bfloat16})
            compute_val(half, mode)
            mul.args = (half, *mul.args[1:])
        elif how == "input_dtype":  # mul's args stay; its input's value turns bf16
            neg = next(n for n in gm.graph.nodes if n.target == aten.neg.default)
            with gm.graph.inserting_before(neg):
                half = gm.graph.call_function(aten._to_copy.default, (neg.args[0],),
                                              {"dtype": torch.bfloat16})
            compute_val(half, mode)
            neg.args = (half,)
            compute_val(neg, mode)
        else:  # "overwritten": the value compute_val gave is replaced by a wrong one
            with mode:
                mul.meta["val"] = torch.empty(3, dtype=torch.float64)
        return gm
    return PassSpec("bad", bad, frozenset({"forward"}))


@pytest.mark.parametrize("how", ["rewire", "input_dtype", "overwritten"])
def test_a_value_computed_before_its_inputs_changed_is_still_checked(how):
    """The check skips a node whose value compute_val gave from inputs that are still as
    they were; any change after it (the node's arguments, an input's dtype, the value
    itself) is recomputed and caught."""
    with FakeTensorMode():
        gm = make_fx(lambda x: (torch.neg(x) * 2).sum())(torch.empty(4, 4))
    with pytest.raises(RuntimeError, match=r"pass 'bad' left \d node.*mul \(aten.mul.Tensor\) carries.*computes"):
        run_pipeline(gm, _ctx(), (_cast_input_after_computing(how),))


def test_values_computed_from_unchanged_inputs_are_not_recomputed(monkeypatch):
    """A pass that computes every value it adds (as the tensor-parallel pass does) costs
    no second fake-tensor run in the check; the pipeline leaves no record behind."""
    from zerofx.passes import fake_vals

    added = []

    def computed(gm, ctx):
        relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
        with gm.graph.inserting_before(relu):
            mul = gm.graph.call_function(aten.mul.Tensor, (relu.args[0], 2))
        added.append(mul.name)
        fake_vals.compute_val(mul, fake_vals.fake_mode_of(gm.graph))
        relu.replace_input_with(relu.args[0], mul)
        fake_vals.compute_val(relu, fake_vals.fake_mode_of(gm.graph))
        return gm

    gm, _ = _traced()
    calls = []
    real = fake_vals.compute_val
    monkeypatch.setattr(fake_vals, "compute_val", lambda n, m: (calls.append(n.name), real(n, m)))
    gm = run_pipeline(gm, _ctx(), (PassSpec("computed", computed, frozenset({"forward"})),))
    assert calls == [*added, "relu"]  # the pass's own two; none by the check
    assert not any("zerofx_val_from" in n.meta for n in gm.graph.nodes)
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    torch.testing.assert_close(gm(x, w), torch.relu(2 * (x @ w)).sum())


def test_declared_pipeline_follows_config():
    assert [p.name for p in build_pipeline(Config())] == []
    bf16 = Config.from_dict({"bf16": {"enabled": True}})
    assert [p.name for p in build_pipeline(bf16)] == ["mixed_precision", "matmul_form"]
    fp16_zero = Config.from_dict({"fp16": {"enabled": True}})
    assert [p.name for p in build_pipeline(fp16_zero, with_runtime=True)] == \
        ["mixed_precision", "param_identity", "bucketing", "matmul_form", "schedule"]
    off = Config.from_dict({"bf16": {"enabled": True},
                            "zerofx": {"disable_passes": ["mixed_precision", "matmul_form"]}})
    assert build_pipeline(off) == ()


def test_gradient_passes_cannot_be_disabled_apart():
    """Without bucketing the tagged gradients would never reach the runtime's buckets."""
    for name, needed in (("bucketing", "bucketing"), ("param_identity", "param_identity")):
        cfg = Config.from_dict({"zerofx": {"disable_passes": [name]}})
        with pytest.raises(ConfigError, match=f"requires pass '{needed}'"):
            build_pipeline(cfg, with_runtime=True)


def test_mixed_precision_cannot_be_disabled_under_bf16_with_a_runtime():
    cfg = Config.from_dict({"bf16": {"enabled": True},
                            "zerofx": {"disable_passes": ["mixed_precision"]}})
    with pytest.raises(ConfigError, match="disable bf16/fp16 instead"):
        build_pipeline(cfg, with_runtime=True)


def test_unknown_disabled_pass_suggests_name():
    cfg = Config.from_dict({"zerofx": {"disable_passes": ["mixed_precison"]}})
    with pytest.raises(ConfigError, match="did you mean 'mixed_precision'"):
        build_pipeline(cfg)


def test_order_constraints_are_checked():
    a = PassSpec("a", _double_relu_input, frozenset({"forward"}))
    b_after_a = PassSpec("b", _double_relu_input, frozenset({"forward"}), after=("a",))
    check_order((a, b_after_a))
    with pytest.raises(ValueError, match="'b' must run after 'a'"):
        check_order((b_after_a, a))
    needs_a = PassSpec("c", _double_relu_input, frozenset({"forward"}), requires=("a",))
    with pytest.raises(ConfigError, match="requires pass 'a'"):
        check_order((needs_a,))
