"""zerofx.initialize and the engine: DeepSpeed's API over the zero backend."""
import argparse
import json

import pytest
import torch

import zerofx
from models import make, mlp_batch


def _cfg(**extra):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "steps_per_print": 3,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0,
                                                        "warmup_max_lr": 1e-2,
                                                        "warmup_num_steps": 5,
                                                        "warmup_type": "linear"}}}
    cfg.update(extra)
    return cfg


def _warmup_lr(k):
    """DeepSpeed's WarmupLR (linear, min 0, max 1e-2, 5 steps) for the k-th step (k >= 1).

    DeepSpeed's scheduler starts at last_batch_iteration = -1 and steps after each optimizer
    step, so step k runs with iteration k - 2 (clamped at 0: the warmup starts at min_lr).
    """
    it = max(k - 2, 0)
    return 1e-2 * min(it, 5) / 5


def test_training_matches_eager_adamw_with_the_same_schedule(no_torchrun_env):
    model, _ = make("mlp")
    ref, _ = make("mlp")
    engine, opt, loader, sched = zerofx.initialize(model=model, config=_cfg())
    assert loader is None and opt is engine.optimizer and sched is engine.lr_scheduler
    assert isinstance(opt, torch.optim.Optimizer)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    for k in range(1, 9):
        batch = mlp_batch(seed=k)
        loss = engine(*batch)
        engine.backward(loss)
        engine.step()
        for group in ref_opt.param_groups:
            group["lr"] = _warmup_lr(k)
        ref_loss = ref(*batch)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert engine.global_steps == 8
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulation_boundary_and_step_count(no_torchrun_env):
    engine, *_ = zerofx.initialize(model=make("mlp")[0],
                                   config=_cfg(gradient_accumulation_steps=3))
    seen = []
    for k in range(6):
        seen.append(engine.is_gradient_accumulation_boundary())
        engine.backward(engine(*mlp_batch(seed=k)))
        engine.step()
    assert seen == [False, False, True, False, False, True]
    assert engine.global_steps == 2 and engine.gradient_accumulation_steps() == 3
    assert engine.train_batch_size() == 12


def _ranks_body(rank, world):
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(
        zero_optimization={"stage": 2}, tensor_parallel={"size": 1}))
    return (engine.global_rank, engine.local_rank, engine.world_size, engine.dp_world_size,
            str(engine.device), engine.zero_optimization_stage())


def test_deepspeed_rank_and_device_attributes(no_torchrun_env):
    """DeepSpeed's engine.global_rank / local_rank / world_size / device /
    zero_optimization_stage(), as scripts use them (`if engine.global_rank == 0`)."""
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg())
    assert (engine.global_rank, engine.local_rank, engine.world_size, engine.dp_world_size,
            engine.device.type, engine.zero_optimization_stage()) == (0, 0, 1, 1, "cpu", 0)


def test_global_grad_norm_and_step_applied_as_deepspeed_reports_them(no_torchrun_env):
    """get_global_grad_norm: the norm of the whole model's gradients before clipping (torch's
    clip_grad_norm_ returns the same on an eager copy); was_step_applied: False for a step an
    fp16 overflow skipped, True for one that updated."""
    model, (x, y) = make("mlp")
    engine, *_ = zerofx.initialize(model=model, config=_cfg(gradient_clipping=0.01))
    assert engine.get_global_grad_norm() is None and not engine.was_step_applied()
    ref = make("mlp")[0]
    ref(x, y).backward()
    want = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01))
    engine.backward(engine(x, y))
    engine.step()
    assert engine.get_global_grad_norm() == pytest.approx(want, rel=1e-5) and want > 0.01
    assert engine.was_step_applied()
    fp16, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(
        fp16={"enabled": True, "initial_scale_power": 32}))  # 2^32 x a gradient: inf in fp16
    fp16.backward(fp16(x, y))
    fp16.step()
    assert not fp16.was_step_applied() and fp16.skipped_steps == 1
    assert fp16.get_global_grad_norm() == float("inf")


def test_every_runtime_tensor_lives_on_the_parameters_device(no_torchrun_env):
    """One device for the flat buffers, the optimizer state and the step's state tensors
    (the step graph reads them all): the parameters'. CPU is the only device here, so this
    checks the plumbing; a GPU run is benchmarks/gpu_check.sh's."""
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(fp16={"enabled": True}))
    rt = engine.runtime
    st = rt.state
    state = [st.flat_params, st.master, st.exp_avg, st.exp_avg_sq, st.full_grads, st.lr,
             st.beta1, st.step_count, st.skipped, st.scaler.scale, st.scaler.hysteresis]
    assert {t.device for t in state} == {engine.device} == {torch.device("cpu")}


@pytest.mark.parametrize("where", ["meta", "split"])
def test_parameters_without_one_real_device_are_refused(no_torchrun_env, where):
    model = make("mlp")[0]
    if where == "meta":
        model = model.to("meta")
    else:
        model.fc1.weight = torch.nn.Parameter(torch.empty_like(model.fc1.weight, device="meta"))
    with pytest.raises(zerofx.ConfigError) as e:
        zerofx.ZeroRuntime(model, _cfg())
    assert ("meta device (no values)" if where == "meta" else
            "fc1.weight on meta") in str(e.value)


@pytest.mark.slow
def test_deepspeed_rank_attributes_on_two_ranks():
    from multiproc import run_ranks

    assert run_ranks(_ranks_body, 2) == [(r, r, 2, 2, "cpu", 2) for r in range(2)]


def test_report_every_steps_per_print(no_torchrun_env, capsys):
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(wall_clock_breakdown=True))
    for k in range(6):
        engine.backward(engine(*mlp_batch(seed=k)))
        engine.step()
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert [l.split(" |")[0] for l in lines] == ["step 3", "step 6"]
    for word in ("loss", "lr", "loss scale", "skipped", "samples/s", "forward", "comm wait"):
        assert word in lines[0]


def test_training_data_gives_this_ranks_micro_batches(no_torchrun_env):
    data = torch.utils.data.TensorDataset(torch.randn(20, 16), torch.randn(20, 8))
    engine, _, loader, _ = zerofx.initialize(model=make("mlp")[0], config=_cfg(),
                                             training_data=data)
    first = [x for x, _ in loader]
    second = [x for x, _ in loader]
    assert [len(x) for x in first] == [4] * 5
    assert sorted(torch.cat(first).sum(1).tolist()) == sorted(data.tensors[0].sum(1).tolist())
    # DeepSpeed's loader never calls set_epoch: every epoch reads the first one's order
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_config_from_args_and_conflicts(tmp_path, no_torchrun_env):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_cfg()))
    parser = zerofx.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    engine, *_ = zerofx.initialize(args=args, model=make("mlp")[0])
    assert engine.train_micro_batch_size_per_gpu() == 4
    with pytest.raises(zerofx.ConfigError, match="more than once"):
        zerofx.initialize(args=args, model=make("mlp")[0], config=_cfg())
    with pytest.raises(zerofx.ConfigError, match="needs model="):
        zerofx.initialize(config=_cfg())


def test_deepspeed_config_readers(no_torchrun_env):
    """The engine methods scripts branch on (DeepSpeed's CIFAR example reads
    bfloat16_enabled()/fp16_enabled() to cast its inputs)."""
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(
        bf16={"enabled": True}, gradient_clipping=0.5, zero_optimization={"stage": 2}))
    assert engine.bfloat16_enabled() and not engine.fp16_enabled()
    assert engine.zero_optimization() and engine.gradient_clipping() == 0.5
    assert engine.get_batch_info() == (4, 4, 1) and engine.micro_steps == 0
    engine.backward(engine(*mlp_batch(seed=0)))
    engine.step()
    assert engine.micro_steps == 1
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(fp16={"enabled": True}))
    assert engine.fp16_enabled() and not engine.bfloat16_enabled()
    # not in the config: DeepSpeed's default (1.0 since 0.19.3), as its engine reports it
    assert not engine.zero_optimization() and engine.gradient_clipping() == 1.0


def test_add_config_arguments_is_deepspeeds():
    """DeepSpeed's rule (deepspeed/__init__.py, _add_core_arguments): --deepspeed,
    --deepspeed_config, --deepscale, --deepscale_config and no --local_rank, so the scripts
    that define --local_rank themselves (17 of DeepSpeedExamples' 23 callers) parse."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    zerofx.add_config_arguments(parser)
    args = parser.parse_args(["--local_rank", "1", "--deepspeed", "--deepscale_config", "x"])
    assert (args.local_rank, args.deepspeed, args.deepscale_config) == (1, True, "x")
    assert args.deepspeed_config is None and args.deepscale is False
    flags = {a for action in zerofx.add_config_arguments(argparse.ArgumentParser())._actions
             for a in action.option_strings}
    assert flags == {"-h", "--help", "--deepspeed", "--deepspeed_config", "--deepscale",
                     "--deepscale_config", "--zerofx_config"}


def _run(engine, seeds):
    losses = []
    for k in seeds:
        loss = engine(*mlp_batch(seed=k))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return losses


def test_checkpoint_resume_is_bitwise_including_the_schedule(tmp_path, no_torchrun_env):
    torch.manual_seed(0)
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg())
    _run(engine, range(4))
    engine.save_checkpoint(tmp_path, client_state={"epoch": 3})
    after = _run(engine, range(4, 8))
    torch._dynamo.reset()
    fresh, *_ = zerofx.initialize(model=make("mlp", seed=5)[0], config=_cfg())
    path, client = fresh.load_checkpoint(tmp_path)
    assert client == {"epoch": 3} and fresh.global_steps == 4
    assert fresh.get_lr() == pytest.approx([_warmup_lr(5)])  # stored as a float32 tensor
    resumed = _run(fresh, range(4, 8))
    assert all(torch.equal(a, b) for a, b in zip(after, resumed))
    for p, q in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(p, q)


ONECYCLE = {"type": "OneCycle", "params": {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2,
                                           "cycle_first_step_size": 3, "decay_step_size": 2,
                                           "decay_lr_rate": 0.1, "decay_mom_rate": 0.05,
                                           "cycle_min_mom": 0.8, "cycle_max_mom": 0.9}}


@pytest.mark.parametrize("opt_type", ["AdamW", "Lamb"])
def test_onecycle_cycles_beta1_like_deepspeed(no_torchrun_env, opt_type):
    """DeepSpeed's OneCycle sets betas = (momentum_at(step), 0.99) before every step; the
    fused kernels read beta1 as a step-graph tensor, so it moves without retracing."""
    from reference import lamb_reference
    from zerofx.runtime.fused_optim import LambHyper
    from zerofx.lr_schedules import make_schedule

    model, ref = make("mlp")[0], make("mlp")[0]
    cfg = _cfg(scheduler=ONECYCLE)
    cfg["optimizer"] = {"type": opt_type, "params": {"lr": 1e-2, "weight_decay": 0.0}}
    engine, *_ = zerofx.initialize(model=model, config=cfg)
    sched = make_schedule(zerofx.Config.from_dict(cfg).scheduler, last_batch_iteration=-1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ref.parameters()]
    betas_seen = set()
    for k in range(1, 10):  # through the cycle (6 steps) into the decay
        x, y = mlp_batch(seed=k)
        engine.backward(engine(x, y))
        engine.step()
        lr, mom = sched.get_last_lr()[0], sched.momentum_at(sched.last_batch_iteration)
        betas_seen.add(mom)
        ref(x, y).backward()
        if opt_type == "AdamW":
            for g in ref_opt.param_groups:
                g["lr"], g["betas"] = lr, (mom, 0.99)
            ref_opt.step()
        else:
            params = list(ref.parameters())
            lamb_reference(params, [p.grad for p in params], [m for m, _ in moments],
                           [v for _, v in moments], lr=lr, step=k,
                           hyper=LambHyper(betas=(mom, 0.99), weight_decay=0.0))
        ref.zero_grad()
        sched.step()
    assert len(betas_seen) >= 4  # beta1 really moved
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_onecycle_momentum_on_a_torch_optimizer_is_reported(no_torchrun_env, caplog):
    model = make("mlp")[0]
    with caplog.at_level("WARNING", logger="zerofx.engine"):
        zerofx.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          config=_cfg(scheduler=ONECYCLE))
    assert "cycle_momentum is not applied to SGD" in caplog.text


def test_save_fp16_model_is_save_16bit_model(tmp_path, no_torchrun_env):
    """DeepSpeed keeps save_fp16_model as the older name of save_16bit_model: same file."""
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(bf16={"enabled": True}))
    assert engine.save_fp16_model(tmp_path / "a") and engine.save_16bit_model(tmp_path / "b")
    a, b = (torch.load(tmp_path / d / "pytorch_model.bin") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for v in a.values()} == {torch.bfloat16}


def test_destroy_detaches_the_engine_from_the_model(no_torchrun_env):
    # DeepSpeed's engine.destroy(): afterwards the model is a plain module again (an eager
    # backward fills .grad, which the engine's hooks had routed into its buckets)
    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg())
    model(*mlp_batch(seed=0)).backward()
    assert all(p.grad is None for p in model.parameters())  # taken by the engine's hooks
    engine.destroy()
    model(*mlp_batch(seed=1)).backward()
    assert all(p.grad is not None for p in model.parameters())
