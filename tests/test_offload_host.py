"""offload_optimizer device cpu (ZeRO-Offload): the fp32 master shard and moments in host memory.

The GPU path (runtime/offload/host.py) runs here on CPU parameters through the forcing
switch (ZEROFX_FORCE_HOST_OFFLOAD=1): the "device" tensors and the host state are distinct
buffers and every gradient and update copy happens. The reference is the same training in
memory: an offloaded run gives the same bits (losses, parameters, master weights, moments,
skips) over 20 steps, and the runtime's device-side tensors hold no fp32 master or moments.
"""
import os

import pytest
import torch

from models import make
from multiproc import run_ranks
from test_offload_nvme import _batch, _train  # the same training loop, another offload

STEPS = 20
FORCE = "ZEROFX_FORCE_HOST_OFFLOAD"


def _config(offload, *, stage=2, opt="AdamW", dtype="bf16", gas=1, clip=0.5,
            form="all_gather"):
    cfg = {"optimizer": {"type": opt, "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000,
                                 "allgather_bucket_size": 5000,
                                 "stage3_param_persistence_threshold": 100},
           "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           # where the update writes: a shard-shaped temporary (all_gather) or, in place,
           # the flat parameters' rows (p2p)
           "zerofx": {"gather_form": form}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    else:  # a first scale that overflows: the first steps are skipped, the rest apply
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 20, "hysteresis": 1}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return cfg


def _device_tensors(rt) -> dict:
    """The runtime's own (device-side) training-state tensors, by name."""
    s = rt.state
    return {"flat_params": s.flat_params, "master": s.master, "exp_avg": s.exp_avg,
            "exp_avg_sq": s.exp_avg_sq, "shard_lowp": s.shard_lowp,
            "shard_grads": s.shard_grads, "full_grads": s.full_grads}


def _result(rt, model, losses):
    from zerofx.runtime.train_state import nbytes

    off = rt.state.offload
    device = _device_tensors(rt)
    with rt.state.optimizer_state() as fp32:
        state = {k: v.clone() for k, v in fp32.items()}
        host_ptrs = [v.data_ptr() for v in fp32.values()]
    out = {"losses": losses, "state": state, "skipped": rt.skipped_steps,
           "params": {n: p.detach().clone() for n, p in model.named_parameters()},
           "device_bytes": nbytes(*device.values()), "shard": rt.plan.shard_numel,
           "offloaded": off is not None,
           "fp32_on_device": [k for k, t in device.items() if t is not None and
                              t.dtype == torch.float32 and t.numel() >= rt.plan.shard_numel],
           "shared": [k for k, t in device.items() if t is not None and t.numel() and
                      t.data_ptr() in host_ptrs],
           "copies": dict(off.copies) if off is not None else None,
           "grad_bytes": rt.plan.shard_numel * rt.plan.grad_dtype.itemsize,
           "out_bytes": rt.plan.shard_numel * rt.plan.compute_dtype.itemsize}
    rt.close()
    return out


def _pair(rank, case, steps=STEPS, name="block"):
    """(in memory, host-offloaded) results of one case on this rank."""
    os.environ[FORCE] = "1"  # (run_ranks' processes too)
    return [_result(*_train(rank, _config(off, **case), steps, name=name)) for off in (False, True)]


def _assert_same(mem, off, where):
    assert off["offloaded"] and not mem["offloaded"], where
    assert off["losses"] == mem["losses"], where
    assert off["skipped"] == mem["skipped"], where
    for n, p in mem["params"].items():
        assert torch.equal(off["params"][n], p), f"{where}: parameter {n}"
    for k, t in mem["state"].items():
        assert torch.equal(off["state"][k], t), f"{where}: {k}"


def _assert_offloaded(mem, off, steps, where, *, lamb=False):
    """The device side holds no fp32 master or moments (12 bytes per shard element less
    than in memory), the host state is its own memory, and each applied step copied the
    gradient shard to the host once and the updated shard back once."""
    assert off["device_bytes"] == mem["device_bytes"] - 12 * off["shard"], where
    assert mem["fp32_on_device"] and not off["fp32_on_device"], where
    assert off["shared"] == [], where
    applied = steps - off["skipped"]
    assert off["copies"] == {"to_host": applied * off["grad_bytes"],
                             "to_device": applied * off["out_bytes"]}, where


def _check(mem, off, case, steps, where):
    _assert_same(mem, off, where)
    _assert_offloaded(mem, off, steps, where)
    if case.get("dtype") == "fp16":
        assert 0 < off["skipped"] < steps // 2, where  # skips happened, and updates too


def test_host_offloaded_training_equals_in_memory_bit_for_bit_quick(monkeypatch,
                                                                    no_torchrun_env):
    """The fast loop's check: a few LAMB steps (the 20-step cases are slow)."""
    monkeypatch.setenv(FORCE, "1")
    case = dict(stage=2, opt="Lamb")
    mem, off = _pair(0, case, steps=4, name="mlp")
    _check(mem, off, case, 4, "quick")


CASES = [dict(stage=s, opt=o, dtype=d, gas=g, clip=c, form=f)
         for s in (1, 2, 3) for o, d, g, c, f in (("AdamW", "bf16", 2, 0.5, "all_gather"),
                                                  ("Lamb", "bf16", 1, 0.5, "p2p"))]
FP16 = dict(stage=2, opt="Adam", dtype="fp16", gas=2, clip=1.0, form="all_gather")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES + [FP16], ids=lambda c: "-".join(map(str, c.values())))
def test_one_rank_20_steps_equal_in_memory(case, monkeypatch, no_torchrun_env):
    monkeypatch.setenv(FORCE, "1")
    mem, off = _pair(0, case)
    _check(mem, off, case, STEPS, str(case))


def _two_rank_body(rank, world, cases):
    return [_pair(rank, case) for case in cases]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_20_steps_equal_in_memory(stage, monkeypatch):
    monkeypatch.setenv(FORCE, "1")
    cases = [c for c in CASES if c["stage"] == stage] + ([FP16] if stage == 2 else [])
    results = run_ranks(_two_rank_body, 2, args=(cases,), timeout_s=600)
    for rank, runs in enumerate(results):
        for case, (mem, off) in zip(cases, runs):
            _check(mem, off, case, STEPS, f"rank {rank}, {case}")


# ---- config and refusals ----------------------------------------------------------------
def test_without_the_switch_cpu_parameters_keep_the_state_in_memory(monkeypatch,
                                                                    no_torchrun_env):
    import zerofx

    monkeypatch.delenv(FORCE, raising=False)
    model, _ = make("mlp")
    rt = zerofx.ZeroRuntime(model, _config(True, stage=1))
    assert rt.state.offload is None and rt.state.master.numel() == rt.plan.shard_numel
    rt.close()


def test_a_torch_optimizer_object_is_refused_by_name(monkeypatch, no_torchrun_env):
    import zerofx
    from zerofx.runtime.offload import OffloadError

    monkeypatch.setenv(FORCE, "1")
    model, _ = make("mlp")
    cfg = _config(True, stage=1)
    del cfg["optimizer"]
    cfg["zero_allow_untested_optimizer"] = True
    with pytest.raises(OffloadError, match="offload_optimizer device 'cpu'.*optimizer"):
        zerofx.ZeroRuntime(model, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_checkpoint_of_host_offloaded_state_loads_in_memory(tmp_path, monkeypatch,
                                                            no_torchrun_env):
    """The offloaded state goes through optimizer_state like the in-memory one: a
    checkpoint saved offloaded resumes in memory to the same bits as an unbroken run."""
    from zerofx.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setenv(FORCE, "1")
    case = dict(stage=2, opt="Lamb")
    whole = _result(*_train(0, _config(False, **case), 4, name="mlp"))
    rt, _, first = _train(0, _config(True, **case), 2, name="mlp")
    save_checkpoint(rt, tmp_path / "ckpt")
    rt.close()
    import zerofx

    torch._dynamo.reset()
    model, _ = make("mlp")
    rt = zerofx.ZeroRuntime(model, _config(False, **case))
    load_checkpoint(rt, tmp_path / "ckpt")
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    second = []
    for step in range(2, 4):
        loss = compiled(*_batch("mlp", 1000 * step))
        rt.backward(loss)
        rt.step()
        second.append(loss.item())
    resumed = _result(rt, model, first + second)
    assert resumed["losses"] == whole["losses"]
    for k, t in whole["state"].items():
        assert torch.equal(resumed["state"][k], t), k
