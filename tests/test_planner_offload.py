"""zerofx-plan with offload and partition_activations (zerofx/planner/offload.py): what it
predicts per rank against what the runtime really holds, writes and moves.

The references are the runtime's own objects on the same model and config: its resident
training state (ZeroRuntime.state_bytes), its files' sizes (fstat of the unlinked files),
the bytes its chunk stream reads and writes in a step, the most the parameter store's step
holds (its chunk buffers and the persistent rows), and the values the
partition_activations pass cuts in a real TP-2 run on 2 processes.
"""
import os

import pytest
import torch

import zerofx
from models import Block, block_batch
from multiproc import run_ranks
from zerofx.planner import plan_rank
from zerofx.runtime.train_state import nbytes

BUCKET = 3000  # elements per bucket: the block model (~17k) makes several


def _cfg(*, stage=2, opt="AdamW", opt_dev=None, param_nvme=None, sub_group=1000, gas=1):
    zero = {"stage": stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": 5000,
            "stage3_prefetch_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100}
    if opt_dev is not None:
        zero["sub_group_size"] = sub_group
        zero["offload_optimizer"] = {"device": opt_dev[0], **(
            {"nvme_path": str(opt_dev[1])} if opt_dev[0] == "nvme" else {})}
    if param_nvme is not None:
        zero["sub_group_size"] = sub_group  # the step's chunks (the optimizer's, if offloaded)
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(param_nvme),
                                 "buffer_count": 3}
    return {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
            "gradient_accumulation_steps": gas,
            "optimizer": {"type": opt, "params": {"lr": 1e-3}}, "zero_optimization": zero}


def _file_bytes(obj) -> int:
    return os.fstat(obj.file.fd).st_size if obj is not None else 0


@pytest.mark.parametrize("stage,opt", [(1, "AdamW"), (2, "Lamb")])  # stage 3: 2 ranks below
def test_nvme_optimizer_rows_are_the_runtimes_resident_state_and_file(
        no_torchrun_env, tmp_path, stage, opt):
    cfg = _cfg(stage=stage, opt=opt, opt_dev=("nvme", tmp_path))
    mem, _ = plan_rank(Block, cfg, block_batch(), world=1)
    plain, _ = plan_rank(Block, _cfg(stage=stage, opt=opt), block_batch(), world=1)
    rt = zerofx.ZeroRuntime(Block(), cfg)
    try:
        assert mem.model_states == rt.state_bytes()
        assert mem.optimizer == rt.state.offload.memory_bytes()  # the chunk buffers only
        assert mem.nvme == _file_bytes(rt.state.offload) == plain.optimizer  # 12 B x shard
        assert mem.parameters == plain.parameters and mem.gradients == plain.gradients
        assert any(k.startswith("on NVMe") and n == mem.nvme for k, n in mem.rows())
    finally:
        rt.close()


def test_host_offload_on_a_gpu_splits_device_and_host_memory(no_torchrun_env, monkeypatch):
    # the runtime's forced host path (CPU buffers standing in for the device's, real copies)
    monkeypatch.setenv("ZEROFX_FORCE_HOST_OFFLOAD", "1")
    cfg = _cfg(stage=2, opt_dev=("cpu", None))
    mem, _ = plan_rank(Block, cfg, block_batch(), world=1, gpu=True)
    on_cpu, _ = plan_rank(Block, cfg, block_batch(), world=1)  # in host memory already
    rt = zerofx.ZeroRuntime(Block(), cfg)
    st = rt.state
    device = nbytes(st.flat_params, st.master, st.exp_avg, st.exp_avg_sq, st.shard_lowp,
                    st.shard_grads, st.full_grads)
    assert mem.model_states == device
    assert mem.host == st.offload.memory_bytes()
    assert mem.model_states + mem.host == rt.state_bytes()
    assert mem.optimizer == 0 and on_cpu.host == 0
    assert on_cpu.model_states == mem.model_states + on_cpu.optimizer


def test_nvme_offload_with_a_gpu_is_refused_by_name(no_torchrun_env, tmp_path):
    with pytest.raises(zerofx.ConfigError, match="offload_optimizer.device 'nvme'.*GPU"):
        plan_rank(Block, _cfg(opt_dev=("nvme", tmp_path)), block_batch(), world=1, gpu=True)
    with pytest.raises(zerofx.ConfigError, match="one data-parallel rank"):
        plan_rank(Block, _cfg(stage=3, param_nvme=tmp_path), block_batch(), world=1)


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["AdamW", "Lamb"])
def test_nvme_traffic_per_step_is_what_the_stream_moves(no_torchrun_env, tmp_path, opt):
    """The bytes the planner prices per step are the chunk stream's counters over one
    step; the step-time item is those bytes at the given disk rate."""
    from zerofx.planner.step_time import measure_host, predict_step_time

    cfg = _cfg(stage=1, opt=opt, opt_dev=("nvme", tmp_path))
    mem, plan = plan_rank(Block, cfg, block_batch(), world=1)
    torch._dynamo.reset()
    model = Block()
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    stream = rt.state.offload.stream
    before = (stream.bytes_read, stream.bytes_written)
    with rt.shape_carriers():
        loss = compiled(*block_batch())
    rt.backward(loss)
    rt.step()
    moved = (stream.bytes_read - before[0], stream.bytes_written - before[1])
    rt.close()
    assert moved == (mem.offload.optimizer_read, mem.offload.optimizer_written)
    n = plan.shard_numel  # Adam 12 + 12 bytes per element; LAMB reads the state twice
    assert moved == ((24 if opt == "Lamb" else 12) * n, 12 * n)
    step = predict_step_time(mem, plan, zerofx.Config.from_any(cfg),
                             measure_host(plan.compute_dtype), disk=(1e9, 2e9, "given"))
    item = [ms for what, ms, _ in step.items if what.startswith("optimizer state on NVMe")]
    assert item == [pytest.approx((moved[0] / 2e9 + moved[1] / 1e9) * 1e3)]


def _param_rank(rank, world, cfg):
    """One step of stage 3 with the shard on NVMe: the resident state, the files, the
    most the step held, whole-shard reads (none) and the most read buffers held at once."""
    torch._dynamo.reset()
    model = Block()
    rt = zerofx.ZeroRuntime(model, cfg)
    store, reads = rt.state.params, []
    read_all = store.read_all

    def recorded():
        out = read_all()
        reads.append(out.numel() * out.element_size())
        return out
    store.read_all = recorded  # checkpoints' reads: training never makes one
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    for micro in range(rt.gas):
        with rt.shape_carriers():
            loss = compiled(*block_batch(seed=10 * rank + micro))
        rt.backward(loss)
        rt.step()
    out = {"state": rt.state_bytes(), "param_file": _file_bytes(store),
           "opt_file": _file_bytes(rt.state.offload), "step": store.peak_step_bytes,
           "whole_reads": reads, "chunks_written": store.chunks_written,
           "buffers": store.peak_buffers * store.cap * store.item,
           "gather_reads": store.bucket_reads}
    rt.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("opt_nvme", [True, False], ids=["optimizer-too", "params-only"])
def test_param_offload_rows_are_what_two_ranks_hold(tmp_path, opt_nvme):
    cfg = _cfg(stage=3, opt_dev=("nvme", tmp_path) if opt_nvme else None,
               param_nvme=tmp_path, sub_group=1000)
    results = run_ranks(_param_rank, 2, args=(cfg,), timeout_s=240)
    for rank, got in enumerate(results):
        mem, plan = plan_rank(Block, cfg, block_batch(), world=2, rank=rank)
        assert got["state"] == mem.model_states, rank  # between steps: no read buffer
        assert got["param_file"] + got["opt_file"] == mem.nvme, rank
        assert got["param_file"] == plan.shard_numel * 2, rank  # the bf16 shard
        # the step: 3 chunk buffers of sub_group_size and the persistent rows, written in
        # ceil(shard / chunk) chunks, never a whole-shard read
        tail = sum(r.numel for r, b in zip(plan.owned(), plan.buckets)
                   if b.offset >= plan.persist_offset)
        chunk = 1000
        assert 0 < tail < plan.shard_numel // 4 and 3 * chunk < plan.shard_numel, rank
        assert got["step"] == mem.offload.param_step == 2 * (3 * chunk + tail), rank
        assert mem.offload.param_step <= mem.step_temporary, rank
        assert got["whole_reads"] == [], rank
        assert got["chunks_written"] == -(-plan.shard_numel // chunk), rank
        assert 0 < got["buffers"] <= mem.offload.param_buffers, rank
        assert mem.offload.param_buffers <= mem.gathered, rank
        # the gathers' reads priced per step: each gathered bucket twice, an upper bound
        # (the backward reuses some forward gathers: 12 reads of 7 buckets here)
        gathered = sum(b.offset < plan.persist_offset for b in plan.buckets)
        assert gathered <= got["gather_reads"] <= 2 * gathered, rank


@pytest.mark.slow
def test_partitioned_activations_are_what_the_pass_cuts_at_tp2():
    """The planner's saved-bytes drop with partition_activations at TP 2 is the drop the
    real pass makes in a 2-process TP-2 run's forward graph (test_partition_activations'
    Megatron stack: zerofx.checkpointing around each block)."""
    from test_partition_activations import MegatronStack, _batch, _cfg as tp_cfg

    results = run_ranks(_tp_rank, 2, args=(), timeout_s=240)
    cut_real = [sum(w - c for w, c in parts) for parts in results]
    assert cut_real[0] > 0 and cut_real[0] == cut_real[1]
    whole, _ = plan_rank(MegatronStack, tp_cfg(False, 1), _batch(0), world=2)
    part, _ = plan_rank(MegatronStack, tp_cfg(True, 1), _batch(0), world=2)
    assert whole.activations - part.activations == cut_real[0]
    one, _ = plan_rank(MegatronStack, {**tp_cfg(True, 1), "tensor_parallel": {"size": 1}},
                       _batch(0), world=1)  # no TP group: nothing to partition over
    plain, _ = plan_rank(MegatronStack, {**tp_cfg(False, 1), "tensor_parallel": {"size": 1}},
                         _batch(0), world=1)
    assert one.activations == plain.activations


def _tp_rank(rank, world):
    from test_partition_activations import MegatronStack, _batch, _cfg as tp_cfg
    from test_partition_activations import _saved_recorder

    torch._dynamo.reset()
    model, seen = MegatronStack(), []
    # the layout found on the traced graph, as the planner finds it (without example
    # inputs the runtime splits this model by its module tree: the MLPs only)
    rt = zerofx.ZeroRuntime(model, tp_cfg(True, 1), example_inputs=_batch(0))
    compiled = torch.compile(model, backend="zero", options={
        "runtime": rt, "extra_passes": (_saved_recorder(seen),)})
    with rt.shape_carriers():
        loss = compiled(*_batch(0))
    loss.backward()
    return [p for _, parts, _ in seen for p in parts]


def _cli(tmp_path, cfg, *extra):
    import json

    from tools.plan import main

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return main(["--config", str(path), "--model", "models:Block", "--inputs",
                 "models:block_batch", *extra])


@pytest.mark.slow
def test_the_command_line_reports_offload_rows_and_traffic(no_torchrun_env, tmp_path,
                                                            capsys):
    cfg = _cfg(stage=2, opt_dev=("nvme", tmp_path))
    assert _cli(tmp_path, cfg, "--disk-gbps", "2") == 0
    out = capsys.readouterr().out
    assert "on NVMe (files, not in memory)" in out and "optimizer states (NVMe" in out
    assert "optimizer state on NVMe" in out and "--disk-gbps 2" in out
    # a GPU: the runtime refuses NVMe offload there, and so does the plan
    assert _cli(tmp_path, cfg, "--device", "h100") == 2
    assert "CPU-only runs" in capsys.readouterr().err
    # offload_optimizer cpu on a GPU is ZeRO-Offload even when planned on a CPU-only host
    host = _cfg(stage=2, opt_dev=("cpu", None))
    assert _cli(tmp_path, host, "--device", "h100", "--world", "8") == 0
    out = capsys.readouterr().out
    assert "optimizer states (on the host)" in out and "host memory (offloaded" in out
    assert "optimizer step on the host" in out


def test_advice_names_offload_when_model_states_do_not_fit(no_torchrun_env, tmp_path):
    from tools.plan import advice

    cfg = _cfg(stage=3)
    mem, plan = plan_rank(Block, cfg, block_batch(), world=2)
    tips = " ".join(advice(mem, zerofx.Config.from_any(cfg), mem.model_states, dp=2))
    assert "offload_optimizer (device nvme" in tips and "offload_param device nvme" in tips
    gpu = " ".join(advice(mem, zerofx.Config.from_any(cfg), mem.model_states, gpu=True, dp=2))
    assert "offload_optimizer (device cpu" in gpu and "offload_param" not in gpu
    done = _cfg(stage=3, opt_dev=("nvme", tmp_path), param_nvme=tmp_path)
    mem, _ = plan_rank(Block, done, block_batch(), world=2)
    assert "offload" not in " ".join(advice(mem, zerofx.Config.from_any(done),
                                            mem.model_states, dp=2))
