"""The optimizer zerofx.initialize returns (zerofx/optimizer.py): a torch.optim.Optimizer whose
group lr drives the step, so torch LR schedulers work on it as on DeepSpeed's; its state_dict
is this rank's partition and load_state_dict restores it, parameters included."""
import pytest
import torch

import zerofx
from models import make, mlp_batch
from multiproc import run_ranks

LR = 1e-2


def _cfg(stage=0, **extra):
    return {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}}, **extra}


def _train(engine, steps, first=0):
    for k in range(first, first + steps):
        engine.backward(engine(*mlp_batch(seed=k)))
        engine.step()


def _reference(steps, schedule):
    """Eager fp32 AdamW on the same batches, the lr set per step by ``schedule(k)``."""
    ref, _ = make("mlp")
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    for k in range(steps):
        for g in opt.param_groups:
            g["lr"] = schedule(k)
        ref(*mlp_batch(seed=k)).backward()
        opt.step()
        opt.zero_grad()
    return ref


def _lr_of_step_lr(k):  # torch's StepLR(step_size=2, gamma=0.5), stepped after each step
    return LR * 0.5 ** (k // 2)


@pytest.mark.parametrize("how", ["on the returned optimizer", "factory given to initialize"])
def test_a_torch_lr_scheduler_moves_zerofxs_lr(no_torchrun_env, how):
    model, _ = make("mlp")
    if how == "factory given to initialize":  # DeepSpeed's lr_scheduler=callable(optimizer)
        engine, opt, _, sched = zerofx.initialize(
            model=model, config=_cfg(),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5))
        assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and sched.optimizer is opt
    else:
        engine, opt, _, _ = zerofx.initialize(model=model, config=_cfg())
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    seen = []
    for k in range(6):
        seen.append(opt.param_groups[0]["lr"])
        _train(engine, 1, first=k)
        if how == "on the returned optimizer":
            sched.step()  # the engine steps a scheduler it was given; this one is the user's
    assert seen == [_lr_of_step_lr(k) for k in range(6)]
    ref = _reference(6, _lr_of_step_lr)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_group_shows_the_lr_a_config_schedule_set(no_torchrun_env):
    cfg = _cfg(scheduler={"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 4}})
    engine, opt, _, _ = zerofx.initialize(model=make("mlp")[0], config=cfg)
    for k in range(5):
        assert opt.param_groups[0]["lr"] == pytest.approx(engine.get_lr()[0], abs=1e-9)
        _train(engine, 1, first=k)
    assert engine.get_lr()[0] > 0


def _resume_body(rank, world, stage, seed_fresh):
    """Train 3 steps, keep optimizer.state_dict(), train 2 more; a fresh engine (other
    initial weights) loads the state and trains the same 2: both must end equal."""
    def engine_from(seed):
        model, _ = make("mlp", seed=seed)
        return zerofx.initialize(model=model, config=_cfg(stage))[:2]

    engine, opt = engine_from(0)
    _train(engine, 3)
    state = opt.state_dict()
    _train(engine, 2, first=3)
    fresh, fresh_opt = engine_from(seed_fresh)
    fresh_opt.load_state_dict(state)
    _train(fresh, 2, first=3)
    mine = [p.detach().clone() for p in engine.module.parameters()]
    with fresh.runtime.gathered_parameters(), engine.runtime.gathered_parameters():
        same = all(torch.equal(a, b) for a, b in zip(engine.module.parameters(),
                                                    fresh.module.parameters()))
    return same, [m.shape for m in mine]


@pytest.mark.parametrize("stage", [0, 2])
def test_state_dict_round_trip_one_rank(no_torchrun_env, stage):
    same, _ = _resume_body(0, 1, stage, seed_fresh=7)
    assert same


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_state_dict_round_trip_two_ranks(stage):
    results = run_ranks(_resume_body, 2, args=(stage, 7))
    assert all(same for same, _ in results)


def test_a_state_of_another_layout_is_refused_with_the_way_out(no_torchrun_env):
    _, opt = zerofx.initialize(model=make("mlp")[0], config=_cfg(0))[:2]
    state = opt.state_dict()
    state["layout"] = {**state["layout"], "dp_size": 4}
    with pytest.raises(zerofx.ConfigError, match="load_checkpoint"):
        opt.load_state_dict(state)


def test_closure_and_zero_grad(no_torchrun_env):
    engine, opt, _, _ = zerofx.initialize(model=make("mlp")[0], config=_cfg())
    opt.zero_grad()  # nothing to clear, no error (scripts call it)
    with pytest.raises(zerofx.ConfigError, match="closure"):
        opt.step(lambda: 0.0)
