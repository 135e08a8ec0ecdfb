"""zerofx-plan's step time (zerofx/planner/step_time.py, graphs.py): FLOPs against a hand
count, collective volumes against ZeRO's formulas, the working-tensor peak against a hand
count of a graph's value lifetimes, and the command line's time section and --device."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import Block, block_batch
from zerofx.config import Config
from zerofx.plan import make_plan
from zerofx.planner import plan_rank
from zerofx.planner.step_time import (GPUS, Device, collectives, device_named,
                                      predict_step_time)
from zerofx.tp.layout import resolve_tp_layout

M, K, H, N = 16, 32, 64, 8  # tokens, input, hidden, output
BF16 = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


class MLP(nn.Module):
    """x @ A -> relu -> @ B -> squared mean: two matmuls, no bias."""

    def __init__(self, recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.a, self.b = nn.Linear(K, H, bias=False), nn.Linear(H, N, bias=False)

    def body(self, x):
        return self.b(torch.relu(self.a(x))).pow(2).mean()

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=False) if self.recompute else self.body(x)


def _mlp_batch():
    return (torch.randn(M, K),)


def test_flops_are_the_hand_count_of_an_mlp(no_torchrun_env):
    """2*m*n*k per matmul: the forward's two, the backward's three (both weight gradients
    and the hidden activation's; the input needs none)."""
    mem, _ = plan_rank(MLP, BF16, _mlp_batch(), world=1)
    (g,) = mem.graphs
    assert g.fw_flops == 2 * M * K * H + 2 * M * H * N
    assert g.bw_flops == 2 * (2 * M * H * N) + 2 * M * K * H


def test_a_checkpointed_forward_is_counted_again_in_the_backward(no_torchrun_env):
    """Checkpointed, the forward saves neither the hidden activation nor its relu (M*H
    each), so the backward recomputes x @ A (2*M*K*H more); y (M*N) is saved, smaller."""
    mem, _ = plan_rank(lambda: MLP(recompute=True), BF16, _mlp_batch(), world=1)
    (g,) = mem.graphs
    assert g.fw_flops == 2 * M * K * H + 2 * M * H * N
    assert g.bw_flops == 2 * (2 * M * H * N) + 2 * M * K * H + 2 * M * K * H
    assert g.saved < M * H * 2 < plan_rank(MLP, BF16, _mlp_batch(), world=1)[0].graphs[0].saved


def test_working_peak_is_the_hand_count_of_value_lifetimes(no_torchrun_env):
    """The MLP's graphs in bf16 (the loss in fp32). Forward: x (fp32 input, alive
    throughout), its bf16 cast xb (saved), h = xb@A, r = relu(h) (saved), y = r@B, y32 =
    fp32(y) (saved), y32^2, its mean. The peak is while relu runs: x, xb, h and r (h is
    freed after its last reader, so the later nodes never reach it). Backward: the peak is
    at its end, the first weight's gradient (H x K) and its copy made while the second
    weight's (N x H) waits for its bucket to complete."""
    mem, _ = plan_rank(MLP, BF16, _mlp_batch(), world=1)
    (g,) = mem.graphs
    bf = 2
    assert g.saved == M * K * bf + M * H * bf + M * N * 4  # xb, r, y32
    assert g.fw_peak == M * K * 4 + M * K * bf + 2 * M * H * bf
    assert g.bw_peak == 2 * H * K * bf + N * H * bf
    assert mem.activations == g.saved and mem.working == max(g.fw_peak, g.bw_peak) - g.saved


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("world", [2, 8])
def test_collective_volume_is_zeros(no_torchrun_env, stage, world):
    """Bytes each rank sends per step, in bf16 (2 bytes per element), Ψ parameters on N
    ranks, a ring's (N-1)/N: stage 0 all-reduces the gradients (2 x 2Ψ); stage 1 all-reduces
    them and all-gathers the parameters (3 x 2Ψ); stage 2 reduce-scatters and all-gathers
    (2 x 2Ψ, the paper's 2Ψ elements); stage 3 reduce-scatters and gathers twice (3 x 2Ψ,
    the paper's 3Ψ), up to each bucket's padding."""
    model = Block()
    psi = sum(p.numel() for p in model.parameters())
    cfg = {**BF16, "zero_optimization": {"stage": stage,
                                         "stage3_param_persistence_threshold": 0}}
    config = Config.from_dict(cfg)  # the plan alone (no graph is traced): as plan_rank's
    plan = make_plan(list(model.named_parameters()), config, rank=0, world_size=world,
                     tp_layout=resolve_tp_layout(model, config, block_batch()))
    times = {0: 2, 1: 3, 2: 2, 3: 3}[stage]
    want = times * 2 * psi * (world - 1) / world
    got = sum(c.volume for c in collectives(plan, config))
    pad = 2 * len(plan.buckets) * world * times
    assert want <= got <= want + pad, (stage, got, want)


def test_step_time_adds_the_items_on_a_cpu_and_overlaps_them_on_a_gpu(no_torchrun_env):
    cfg = {**BF16, "zero_optimization": {"stage": 2}}
    mem, plan = plan_rank(Block, cfg, block_batch(), world=4)
    config = Config.from_dict(cfg)
    host = Device("cpu", {torch.bfloat16: 1e9}, 1e9, "test rates", gloo=True)
    step = predict_step_time(mem, plan, config, host)
    assert step.ms == pytest.approx(sum(ms for _, ms, _ in step.items))
    flops = sum(g.fw_flops + g.bw_flops for g in mem.graphs)
    assert sum(ms for what, ms, _ in step.items if "matmuls" in what) == \
        pytest.approx(flops / 1e9 * 1e3)
    gpu = predict_step_time(mem, plan, config, GPUS["h100"])
    exposed = sum(ms for _, ms, ov in gpu.items if not ov)
    assert exposed <= gpu.ms <= sum(ms for _, ms, _ in gpu.items)


def test_an_unknown_device_is_named(no_torchrun_env, tmp_path):
    from tools.plan import main

    with pytest.raises(Exception, match="unknown device 'tpu9'.*h100, h200, this-host"):
        device_named("tpu9", dtype=torch.bfloat16)
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    with pytest.raises(SystemExit, match="--device 'a100x'.*h100, h200, this-host"):
        main(["--config", str(cfg), "--model", "models:Block", "--device", "a100x"])


@pytest.mark.slow
def test_the_command_line_prints_the_step_time(no_torchrun_env, tmp_path, capsys):
    from tools.plan import main

    cfg = tmp_path / "ds.json"
    cfg.write_text('{"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": true}, '
                   '"zero_optimization": {"stage": 2}, '
                   '"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}')
    assert main(["--config", str(cfg), "--model", "models:Block", "--inputs",
                 "models:block_batch", "--world", "16", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "step time on h200" in out and "ms predicted" in out
    assert "backward matmuls" in out and "gradients reduce-scattered" in out
