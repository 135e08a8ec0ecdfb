"""The tensor-parallel layout: Megatron's patterns found by structure, explicit plans, and every
bad plan refused before anything runs."""
import pytest
import torch
from torch import nn

import zerofx
from models import MLP, Block
from zerofx.plan import make_plan
from zerofx.tp.layout import TPPlanError, TPShard, resolve_tp_layout


def _cfg(size=2, plan=None):
    tp = {"size": size} if plan is None else {"size": size, "plan": plan}
    return zerofx.Config.from_dict({"tensor_parallel": tp})


def _styles(layout):
    return {c.module: (c.style, c.parts) for c in layout.choices}


def test_detects_attention_and_mlp_of_a_gpt_block():
    layout = resolve_tp_layout(Block(), _cfg())
    assert _styles(layout) == {"qkv": ("colwise", 3), "proj": ("rowwise", 1),
                               "fc1": ("colwise", 1), "fc2": ("rowwise", 1)}
    assert set(layout.shards) == {"qkv.weight", "proj.weight", "fc1.weight", "fc1.bias",
                                  "fc2.weight"}  # row-parallel biases stay whole
    assert layout.shards["proj.weight"] == TPShard(1, 1, (32, 32))
    assert all("head" not in c.module for c in layout.choices)  # the LM head stays whole


def test_detects_separate_q_k_v_projections_by_name():
    from models import LlamaStyleAttention

    layout = resolve_tp_layout(LlamaStyleAttention(), _cfg())
    assert _styles(layout) == {"q_proj": ("colwise", 1), "k_proj": ("colwise", 1),
                               "v_proj": ("colwise", 1), "o_proj": ("rowwise", 1)}
    assert all("q, k, v" in c.reason or "output" in c.reason for c in layout.choices)


def test_explicit_plan_by_module_or_parameter_name():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(MLP() for _ in range(2))

    plan = {"blocks.*.fc1": "colwise", "blocks.*.fc2.weight": "rowwise"}
    layout = resolve_tp_layout(Stack(), _cfg(plan=plan))
    assert _styles(layout) == {"blocks.0.fc1": ("colwise", 1), "blocks.0.fc2": ("rowwise", 1),
                               "blocks.1.fc1": ("colwise", 1), "blocks.1.fc2": ("rowwise", 1)}
    assert "plan pattern" in layout.choices[0].reason


def test_fused_qkv_is_split_per_part():
    shard = TPShard(0, 3, (12, 2))
    w = torch.arange(24.0).reshape(12, 2)  # rows: q 0-3, k 4-7, v 8-11
    for rank in range(2):
        rows = [r for part in range(3) for r in range(4 * part + 2 * rank, 4 * part + 2 * rank + 2)]
        torch.testing.assert_close(shard.local_piece(w, 2, rank), w[rows])
    assert shard.local_shape(2) == (6, 2)


def test_plan_shapes_are_local_and_bytes_halve():
    model = Block()
    cfg = _cfg()
    named = list(model.named_parameters())
    whole = make_plan(named, zerofx.Config.from_dict({}))
    plan = make_plan(named, cfg, rank=0, world_size=2, tp_layout=resolve_tp_layout(model, cfg))
    split = {s.name for s in plan.params if s.tp is not None}
    for s in plan.params:
        full = whole.slot(s.name).numel
        assert s.numel == (full // 2 if s.name in split else full), s.name
        assert s.tp_split == (s.name in split)
    assert "tensor-parallel layout" in plan.describe()


@pytest.mark.parametrize("plan,match", [
    ({"fc3": "colwise"}, r"'fc3' matches no Linear"),
    ({"fc1": "colwise", "fc*": "rowwise"}, "matched as colwise and as rowwise"),
])
@pytest.mark.parametrize("size", [1, 2])  # size 1 checks the plan too: no typo waits
def test_bad_plans_name_the_pattern(plan, match, size):
    with pytest.raises(TPPlanError, match=match):
        resolve_tp_layout(MLP(), _cfg(size, plan=plan))


def test_indivisible_layer_and_heads_are_refused():
    with pytest.raises(TPPlanError, match=r"fc1 \(colwise\): out_features=32 .*size=3"):
        resolve_tp_layout(MLP(), _cfg(3, {"fc1": "colwise", "fc2": "rowwise"}))
    block = Block(d=36, heads=6)
    with pytest.raises(TPPlanError, match="6 attention heads are not divisible .*size=4"):
        resolve_tp_layout(block, _cfg(4, {"qkv": "colwise", "proj": "rowwise"}))


class _NormedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 3)), _NormedMLP()])
def test_nothing_to_split_says_how_to_give_a_plan(model):
    # a LayerNorm between two Linears is not Megatron's MLP: no guess rather than a bad one
    with pytest.raises(TPPlanError, match="give tensor_parallel.plan"):
        resolve_tp_layout(model, _cfg())


def test_activation_modules_between_an_mlps_linears_are_fine():
    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.0), nn.Linear(32, 8))
    assert _styles(resolve_tp_layout(mlp, _cfg())) == {"0": ("colwise", 1), "3": ("rowwise", 1)}


def test_config_rejects_unknown_style():
    with pytest.raises(zerofx.ConfigError, match="tensor_parallel.plan"):
        _cfg(plan={"fc1": "diagonal"})


def test_backend_refuses_tensor_parallel_without_runtime(no_torchrun_env):
    model, (x, y) = MLP(), (torch.randn(2, 16), torch.randn(2, 8))
    compiled = torch.compile(model, backend="zero",
                             options={"config": {"tensor_parallel": {"size": 2}}})
    with pytest.raises(Exception, match="zerofx.initialize"):
        compiled(x, y)
