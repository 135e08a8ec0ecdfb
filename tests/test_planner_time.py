"""zerofx-plan's step time (zerofx/planner/step_time.py, rates.py, graphs.py): FLOPs against a
hand count, each op class priced at its own rate (against hand counts of bytes and ops),
collective volumes against ZeRO's formulas, the working-tensor peak against a hand count of
a graph's value lifetimes, the GPU rates against the data sheets, this host's prediction
against a measured step, and the command line's time section and --device."""
import time

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import Block, block_batch
from zerofx.config import Config
from zerofx.plan import make_plan
from zerofx.planner import plan_rank
from zerofx.planner.rates import CLASSES, Rates
from zerofx.planner.step_time import (GPUS, Device, collectives, device_named, graph_items,
                                      measure_host, predict_step_time)
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
    host = Device("cpu", _rates(1e9, 1e9), gloo=True)
    step = predict_step_time(mem, plan, config, host)
    assert step.ms == pytest.approx(sum(ms for _, ms, _ in step.items))
    flops = sum(g.fw_flops + g.bw_flops for g in mem.graphs)
    assert sum(ms for what, ms, _ in step.items if "matmuls" in what or "attention" in what) \
        == pytest.approx(flops / 1e9 * 1e3)
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
    # a block this small is launch-bound on a GPU: the dispatch leads the items
    assert "op dispatch" in out and "gradients reduce-scattered" in out


def _rates(flops: float, bandwidth: float, *, overhead_s: float = 0.0, **by_class) -> Rates:
    """Rates with every class at ``flops`` or ``bandwidth`` (fp32 and bf16), except
    ``by_class`` (class -> rate)."""
    rates = {(c, dt): by_class.get(c, flops if c in ("matmul", "attention", "attention_bw")
                                   else bandwidth)
             for c in CLASSES for dt in (torch.float32, torch.bfloat16)}
    return Rates({k: v for k, v in rates.items() if k[0].startswith(("matmul", "attention"))},
                 {k: v for k, v in rates.items() if not k[0].startswith(("matmul", "attention"))},
                 optimizer_s=0.0, overhead_s=overhead_s, source="test rates")


class Tanhs(nn.Module):
    """x * w, then ``n`` tanh in a row, summed: a graph of n transcendental ops."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.w = n, nn.Parameter(torch.ones(K))

    def forward(self, x):
        h = x * self.w
        for _ in range(self.n):
            h = torch.tanh(h)
        return h.sum()


FP32 = {"train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def _items(mem, rates) -> dict:
    return {what.split(" (")[0]: ms for what, ms, _ in graph_items(mem.graphs, rates, 1)}


@pytest.mark.parametrize("n", [1, 4])
def test_n_tanh_ops_cost_n_times_their_bytes_at_the_transcendental_rate(no_torchrun_env, n):
    """Each fp32 tanh of an M x K tensor reads and writes M*K*4 bytes: n of them cost
    n * 2 * M*K*4 bytes at the transcendental rate, whatever the other classes' rates."""
    mem, _ = plan_rank(lambda: Tanhs(n), FP32, _mlp_batch(), world=1)
    rate = 3e9
    items = _items(mem, _rates(1e12, 1e12, transcendental=rate))
    assert items["transcendental ops"] == pytest.approx(n * 2 * M * K * 4 / rate * 1e3)
    slow_other = _items(mem, _rates(1e12, 1e6, transcendental=rate))
    assert slow_other["transcendental ops"] == items["transcendental ops"]


def test_dispatch_is_the_op_count_times_the_overhead(no_torchrun_env):
    """On a CPU every op dispatched adds the overhead, views included: four tanh more add at
    least the four tanh and their four tanh_backward (and the aliases of the saved outputs:
    views, dispatched as well)."""
    over = 5e-6
    counts = []
    for n in (1, 5):
        mem, _ = plan_rank(lambda: Tanhs(n), FP32, _mlp_batch(), world=1)
        (g,) = mem.graphs
        ops = len(g.fw_ops) + len(g.bw_ops)
        assert _items(mem, _rates(1e12, 1e12, overhead_s=over))["op dispatch"] == \
            pytest.approx(ops * over * 1e3)
        counts.append(ops)
    assert counts[1] - counts[0] >= 2 * 4


def test_matmuls_are_priced_in_their_dtype(no_torchrun_env):
    """The MLP's matmuls in bf16 at the bf16 rate, in fp32 at the fp32 one (the hand count
    of FLOPs of test_flops_are_the_hand_count_of_an_mlp)."""
    flops = 2 * M * K * H + 2 * M * H * N + 2 * (2 * M * H * N) + 2 * M * K * H
    rates = _rates(1e9, 1e12)
    rates.flops["matmul", torch.float32] = 1e8
    for cfg, rate in ((BF16, 1e9), (FP32, 1e8)):
        mem, _ = plan_rank(MLP, cfg, _mlp_batch(), world=1)
        items = _items(mem, rates)
        assert items["forward matmuls"] + items["backward matmuls, recompute included"] == \
            pytest.approx(flops / rate * 1e3)


def test_gpu_rates_are_the_data_sheets_times_the_stated_efficiencies():
    """H100 SXM: 989.4 dense bf16 TFLOPS, 3.35 TB/s; H200 the same FLOPS, 4.8 TB/s. The
    host issues an op per launch: ten ops of no work cost ten launches; behind a kernel
    longer than the launches that follow it, those launches cost nothing."""
    from zerofx.planner.rates import GPU_BANDWIDTH_EFFICIENCY, GPU_EFFICIENCY, GPU_LAUNCH_S

    for name, tbs in (("h100", 3.35), ("h200", 4.8)):
        r = GPUS[name].rates
        assert r.rate("matmul", torch.bfloat16) == pytest.approx(989.4e12 * GPU_EFFICIENCY[
            "matmul"])
        assert r.rate("transcendental", torch.bfloat16) == pytest.approx(
            tbs * 1e12 * GPU_BANDWIDTH_EFFICIENCY["transcendental"])
        assert r.dispatch_seconds([0.0] * 10) == pytest.approx(10 * GPU_LAUNCH_S)
        assert r.dispatch_seconds([1.0] + [0.0] * 10) == pytest.approx(GPU_LAUNCH_S)
        assert r.fresh_page_s == 0.0


@pytest.mark.slow
def test_this_host_predicts_a_small_mlp_within_a_factor_of_two(no_torchrun_env):
    """The this-host prediction of an MLP block's training step (bf16, AdamW) against its
    measured CPU time on one thread: the least of three steps, so that other processes on
    a shared host inflate neither side much (the calibration takes its least too)."""
    import zerofx

    class Block(nn.Module):
        def __init__(self, d=512):
            super().__init__()
            self.up, self.down, self.norm = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), \
                nn.LayerNorm(d)

        def forward(self, x):
            h = self.down(nn.functional.gelu(self.up(self.norm(x)), approximate="tanh"))
            return (x + h).float().pow(2).mean()

    x = torch.randn(1024, 512)
    cfg = {**BF16, "gradient_clipping": 1.0}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        device = measure_host(torch.bfloat16, threads=1)
        assert measure_host(torch.bfloat16, threads=1).rates is device.rates  # timed once
        mem, plan = plan_rank(Block, cfg, (x,), world=1)
        predicted = predict_step_time(mem, plan, Config.from_dict(cfg), device).ms
        torch.manual_seed(0)
        engine, *_ = zerofx.initialize(model=Block(), config=cfg)
        cpu = []
        for _ in range(4):
            c0 = time.process_time()
            engine.backward(engine(x))
            engine.step()
            cpu.append((time.process_time() - c0) * 1e3)
    finally:
        torch.set_num_threads(old)
    measured = min(cpu[1:])  # the first step compiles
    assert 0.5 <= predicted / measured <= 2.0, (predicted, measured)
