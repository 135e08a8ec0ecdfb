"""LR schedules against a plain-Python transcription of DeepSpeed's lr_schedules.py."""
import logging
import math

import pytest
import torch

from zerofx.config import (ConfigError, LRRangeTestParams, OneCycleParams, SchedulerConfig,
                           WarmupCosineLRParams, WarmupDecayLRParams, WarmupLRParams)
from zerofx.lr_schedules import Schedule, make_schedule


# ---- the reference: DeepSpeed's get_lr()/get_mom() as functions of last_batch_iteration ----

def ds_warmup_gamma(it, warmup, kind):
    warmup = max(2, warmup)
    if it < warmup:
        if kind == "log":
            return (1.0 / math.log(warmup)) * math.log(it + 1)
        return it / warmup
    return 1.0


def ds_warmup_lr(it, lo, hi, warmup, kind):
    if it < 0:
        return lo
    return lo + (hi - lo) * ds_warmup_gamma(it, warmup, kind)


def ds_warmup_decay_lr(it, lo, hi, warmup, kind, total):
    if it < 0:
        return lo
    if it < max(2, warmup):
        gamma = ds_warmup_gamma(it, warmup, kind)
    else:
        gamma = max(0.0, float(total - it) / float(max(1.0, total - max(2, warmup))))
    return lo + (hi - lo) * gamma


def ds_one_cycle_scale(it, first, second, stairs1, stairs2):
    total = float(first) + float(second)
    ratio = float(first) / total
    bi = it + 1
    cycle = math.floor(1 + bi / total)
    x = 1.0 + bi / total - cycle
    if x <= ratio:
        scale, stairs = x / ratio, stairs1
    else:
        scale, stairs = (x - 1) / (ratio - 1), stairs2
    if stairs > 0:
        ci = bi % total
        if ci <= first:
            pos = ci * stairs / float(first)
        else:
            pos = (total - ci) * stairs / float(second)
        scale = math.floor(pos) / stairs
    return scale


def ds_one_cycle(it, p):
    """(lr, beta1 or None), DeepSpeed's OneCycle.get_lr()/get_mom() for OneCycleParams p."""
    first = p.cycle_first_step_size
    second = first if p.cycle_second_step_size is None else p.cycle_second_step_size
    total = float(first + second)
    if it < total:
        stairs2 = p.cycle_first_stair_count if p.cycle_second_stair_count is None \
            else p.cycle_second_stair_count
        s = ds_one_cycle_scale(it, first, second, p.cycle_first_stair_count, stairs2)
        lr = p.cycle_min_lr + (p.cycle_max_lr - p.cycle_min_lr) * s
        mom = p.cycle_max_mom - (p.cycle_max_mom - p.cycle_min_mom) * s
    else:
        interval = (it - total + 1) / p.decay_step_size if p.decay_step_size else None
        lr, mom = p.cycle_min_lr, p.cycle_max_mom
        if interval is not None and p.decay_lr_rate != 0:
            lr = p.cycle_min_lr / (1 + p.decay_lr_rate * interval)
        if interval is not None and p.decay_mom_rate != 0:
            mom = p.cycle_max_mom * (1 + p.decay_mom_rate * interval)
    if it < 0:  # the constructor sets betas to the min momentum, off the cycle
        mom = p.cycle_min_mom
    return lr, (mom if p.cycle_momentum else None)


def ds_range_test_lr(it, lo, size, rate, staircase):
    interval = float(it + 1) / size
    if staircase:
        interval = math.floor(interval)
    return lo * (1 + rate * interval)


def ds_warmup_cosine_ratio(it, total, min_ratio, warmup, cos_min, kind):
    """DeepSpeed 0.19's WarmupCosineLR.get_lr_ratio(); get_lr() is org_lr * ratio, 0 before
    the first step."""
    warmup = max(2, warmup)
    if it < warmup:
        r = (1.0 / math.log(warmup)) * math.log(it + 1) if kind == "log" else it / warmup
        return min_ratio + r * (1. - min_ratio)
    progress = min(1.0, (it - warmup + 1) / max(1, total - warmup))
    return max(0.0, cos_min + (1. - cos_min) * ((1 + math.cos(math.pi * progress)) / 2))


def close(a, b):
    return a == pytest.approx(b, rel=1e-12, abs=1e-300)


def steps_around(*marks):
    """Steps 0..3 and each mark -1/0/+1, plus far past the end."""
    pts = {-1, 0, 1, 2, 3, 10_000, 123_457}
    for m in marks:
        pts |= {m - 1, m, m + 1}
    return sorted(p for p in pts if p >= -1)


def sched(type_, params):
    return make_schedule(SchedulerConfig(type=type_, params=params))


# ---- WarmupLR / WarmupDecayLR ----

WARMUP_CASES = [
    dict(warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type="linear"),
    dict(warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type="log"),
    dict(warmup_min_lr=1e-5, warmup_max_lr=3e-4, warmup_num_steps=1000, warmup_type="log"),
    dict(warmup_min_lr=2e-4, warmup_max_lr=1e-4, warmup_num_steps=7, warmup_type="linear"),
    dict(warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=1, warmup_type="log"),
    dict(warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=2, warmup_type="log"),
    dict(warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=1, warmup_type="linear"),
]


@pytest.mark.parametrize("kw", WARMUP_CASES)
def test_warmup_lr_matches_deepspeed(kw):
    s = sched("WarmupLR", WarmupLRParams(**kw))
    args = (kw["warmup_min_lr"], kw["warmup_max_lr"], kw["warmup_num_steps"], kw["warmup_type"])
    for it in steps_around(kw["warmup_num_steps"], 2):
        assert close(s.lr_at(it), ds_warmup_lr(it, *args)), it
        assert s.momentum_at(it) is None


@pytest.mark.parametrize("kw", WARMUP_CASES)
@pytest.mark.parametrize("total", [1, 10, 25, 5000])
def test_warmup_decay_lr_matches_deepspeed(kw, total):
    s = sched("WarmupDecayLR", WarmupDecayLRParams(total_num_steps=total, **kw))
    args = (kw["warmup_min_lr"], kw["warmup_max_lr"], kw["warmup_num_steps"], kw["warmup_type"])
    for it in steps_around(kw["warmup_num_steps"], total, 2):
        assert close(s.lr_at(it), ds_warmup_decay_lr(it, *args, total)), it


def test_warmup_known_values():
    lin = sched("WarmupLR", WarmupLRParams(warmup_max_lr=1e-3, warmup_num_steps=10,
                                           warmup_type="linear"))
    assert [lin.lr_at(i) for i in (0, 5, 10, 50)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    lg = sched("WarmupLR", WarmupLRParams(warmup_max_lr=1e-3, warmup_num_steps=10))
    assert lg.lr_at(0) == 0.0 and lg.lr_at(9) == pytest.approx(1e-3)  # log(10)/log(10)
    assert lg.lr_at(4) == pytest.approx(1e-3 * math.log(5) / math.log(10))
    dec = sched("WarmupDecayLR", WarmupDecayLRParams(warmup_max_lr=1e-3, warmup_num_steps=10,
                                                     warmup_type="linear", total_num_steps=20))
    assert [dec.lr_at(i) for i in (10, 15, 20, 30)] == pytest.approx([1e-3, 5e-4, 0.0, 0.0])


@pytest.mark.parametrize("type_,cls", [("WarmupLR", WarmupLRParams),
                                       ("WarmupDecayLR", WarmupDecayLRParams)])
def test_zero_warmup_steps_is_a_config_error(type_, cls):
    extra = {"total_num_steps": 10} if cls is WarmupDecayLRParams else {}
    with pytest.raises(ConfigError, match="warmup_num_steps.*>= 1"):  # at Config already
        sched(type_, cls(warmup_num_steps=0, **extra))


def test_warmup_decay_short_total_warns_and_runs(caplog):
    with caplog.at_level(logging.WARNING, logger="zerofx.lr_schedules"):
        s = sched("WarmupDecayLR", WarmupDecayLRParams(total_num_steps=5, warmup_num_steps=10))
    assert "total_num_steps 5 is less than warmup_num_steps 10" in caplog.text
    assert s.lr_at(9) > 0 and s.lr_at(10) == 0.0


# ---- OneCycle ----

ONE_CYCLE_CASES = [
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=10),
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=10, cycle_second_step_size=30,
         decay_step_size=5, decay_lr_rate=0.5, decay_mom_rate=0.01),
    dict(cycle_min_lr=0.0, cycle_max_lr=0.1, cycle_first_step_size=7, cycle_second_step_size=3,
         decay_step_size=4, decay_lr_rate=0.1, cycle_momentum=False),
    dict(cycle_min_lr=1e-3, cycle_max_lr=1e-2, cycle_first_step_size=1, cycle_second_step_size=1,
         decay_step_size=0, decay_lr_rate=0.3, cycle_min_mom=0.85, cycle_max_mom=0.95),
    dict(cycle_min_lr=2e-3, cycle_max_lr=5e-4, cycle_first_step_size=2000),
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=10, cycle_first_stair_count=4),
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=9, cycle_second_step_size=6,
         cycle_first_stair_count=3, cycle_second_stair_count=5, decay_step_size=2,
         decay_lr_rate=0.5),
    dict(cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=7, cycle_second_step_size=3,
         cycle_first_stair_count=0, cycle_second_stair_count=2),
]


@pytest.mark.parametrize("kw", ONE_CYCLE_CASES)
def test_one_cycle_matches_deepspeed(kw):
    p = OneCycleParams(**kw)
    s = sched("OneCycle", p)
    first = p.cycle_first_step_size
    total = first + (p.cycle_second_step_size or first)
    for it in steps_around(first, total, total + p.decay_step_size, total + 3 * p.decay_step_size):
        lr, mom = ds_one_cycle(it, p)
        assert close(s.lr_at(it), lr), it
        got = s.momentum_at(it)
        assert (got is None) if mom is None else close(got, mom), it


def test_one_cycle_known_values():
    s = sched("OneCycle", OneCycleParams(cycle_min_lr=0.0, cycle_max_lr=1.0,
                                         cycle_first_step_size=4, cycle_min_mom=0.8,
                                         cycle_max_mom=0.9))
    # peak after first_step_size steps (DeepSpeed's +1: lr_at(k) is position k+1 of the cycle)
    assert [s.lr_at(i) for i in (-1, 0, 1, 3, 5, 6, 7)] == pytest.approx(
        [0.0, 0.25, 0.5, 1.0, 0.5, 0.25, 0.0])
    assert s.momentum_at(3) == pytest.approx(0.8) and s.momentum_at(0) == pytest.approx(0.875)
    assert s.momentum_at(-1) == 0.8  # DeepSpeed's constructor value, not the cycle's 0.9
    assert s.lr_at(100) == 0.0 and s.momentum_at(100) == 0.9  # no decay configured


def test_one_cycle_stairs_known_values():
    # 2 stairs up over 4 steps, 1 stair down over 2: the lr holds flat, then jumps
    s = sched("OneCycle", OneCycleParams(cycle_min_lr=0.0, cycle_max_lr=1.0,
                                         cycle_first_step_size=4, cycle_second_step_size=2,
                                         cycle_first_stair_count=2, cycle_second_stair_count=1))
    assert [s.lr_at(i) for i in range(-1, 7)] == [0.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0]
    # asymmetric cycle: the float scale is 1e-16 under the peak; stairs still reach it
    kw = dict(cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=1,
              cycle_second_step_size=2)
    assert sched("OneCycle", OneCycleParams(**kw)).lr_at(0) < 1.0
    assert sched("OneCycle", OneCycleParams(cycle_first_stair_count=1, **kw)).lr_at(0) == 1.0


# ---- LRRangeTest ----

@pytest.mark.parametrize("staircase", [False, True])
@pytest.mark.parametrize("lo,size,rate", [(1e-3, 2000, 1.0), (1e-5, 3, 0.5), (0.01, 1, 2.0)])
def test_range_test_matches_deepspeed(staircase, lo, size, rate):
    s = sched("LRRangeTest", LRRangeTestParams(lr_range_test_min_lr=lo,
                                               lr_range_test_step_size=size,
                                               lr_range_test_step_rate=rate,
                                               lr_range_test_staircase=staircase))
    for it in steps_around(size, 2 * size, 5 * size):
        assert close(s.lr_at(it), ds_range_test_lr(it, lo, size, rate, staircase)), it
        assert s.momentum_at(it) is None


def test_range_test_staircase_known_values():
    p = dict(lr_range_test_min_lr=1.0, lr_range_test_step_size=4, lr_range_test_step_rate=1.0)
    stair = sched("LRRangeTest", LRRangeTestParams(lr_range_test_staircase=True, **p))
    smooth = sched("LRRangeTest", LRRangeTestParams(**p))
    assert [stair.lr_at(i) for i in (-1, 0, 2, 3, 6, 7)] == [1.0, 1.0, 1.0, 2.0, 2.0, 3.0]
    assert [smooth.lr_at(i) for i in (-1, 0, 1, 3)] == [1.0, 1.25, 1.5, 2.0]


# ---- WarmupCosineLR: a ratio of the optimizer's lr ----

@pytest.mark.parametrize("kw", [
    dict(warmup_min_ratio=0.0, warmup_num_steps=10, cos_min_ratio=1e-4, warmup_type="log"),
    dict(warmup_min_ratio=0.1, warmup_num_steps=7, cos_min_ratio=0.05, warmup_type="linear"),
    dict(warmup_min_ratio=0.0, warmup_num_steps=1, cos_min_ratio=0.0, warmup_type="log"),
])
@pytest.mark.parametrize("total", [1, 10, 40, 5000])
def test_warmup_cosine_lr_matches_deepspeed(kw, total):
    s = make_schedule(SchedulerConfig(type="WarmupCosineLR", params=WarmupCosineLRParams(
        total_num_steps=total, **kw)), base_lr=3e-4)
    args = (total, kw["warmup_min_ratio"], kw["warmup_num_steps"], kw["cos_min_ratio"],
            kw["warmup_type"])
    assert s.lr_at(-1) == 0.0
    for it in steps_around(kw["warmup_num_steps"], total, 2):
        if it >= 0:
            assert close(s.lr_at(it), 3e-4 * ds_warmup_cosine_ratio(it, *args)), it
    # the cosine ends at the floor and stays there (0.19's clamp), never rising again
    assert close(s.lr_at(total + 10_000), 3e-4 * kw["cos_min_ratio"])


def test_warmup_cosine_lr_needs_the_optimizers_lr_and_a_total():
    cfg = SchedulerConfig(type="WarmupCosineLR",
                          params=WarmupCosineLRParams(total_num_steps=100))
    with pytest.raises(ConfigError, match="base_lr"):
        make_schedule(cfg)
    with pytest.raises(ConfigError, match="total_num_steps"):
        SchedulerConfig(type="WarmupCosineLR")
    with pytest.raises(ConfigError, match="cos_min_ratio"):
        WarmupCosineLRParams(total_num_steps=100, cos_min_ratio=2.0)


def test_the_engine_scales_its_optimizers_lr_by_warmup_cosine(no_torchrun_env):
    """The engine's lr is the config optimizer's lr times DeepSpeed's ratio, with DeepSpeed's
    step timing (the k-th applied step runs at last_batch_iteration k - 1)."""
    import zerofx
    from models import make as make_model, mlp_batch

    cfg = {"train_micro_batch_size_per_gpu": 8,
           "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.0}},
           "scheduler": {"type": "WarmupCosineLR", "params": {
               "total_num_steps": 6, "warmup_num_steps": 3, "warmup_type": "linear",
               "warmup_min_ratio": 0.2, "cos_min_ratio": 0.1}}}
    engine, *_ = zerofx.initialize(model=make_model("mlp")[0], config=cfg)
    used = []
    for k in range(8):
        used.append(float(engine.runtime.state.lr))
        engine.backward(engine(*mlp_batch(seed=k)))
        engine.step()
    want = [2e-2 * ds_warmup_cosine_ratio(k - 1, 6, 0.2, 3, 0.1, "linear") if k else 0.0
            for k in range(8)]
    assert used == pytest.approx(want, rel=1e-6)


# ---- the counter: DeepSpeed's step()/get_last_lr()/state_dict() surface ----

ALL_CONFIGS = [
    SchedulerConfig(type="WarmupLR"),
    SchedulerConfig(type="WarmupDecayLR", params=WarmupDecayLRParams(total_num_steps=30,
                                                                     warmup_num_steps=8)),
    SchedulerConfig(type="OneCycle", params=OneCycleParams(
        cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=5, decay_step_size=2,
        decay_lr_rate=0.2)),
    SchedulerConfig(type="LRRangeTest", params=LRRangeTestParams(lr_range_test_step_size=3,
                                                                 lr_range_test_staircase=True)),
]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.type)
def test_counter_and_state_dict_round_trip(cfg):
    s = make_schedule(cfg)
    assert isinstance(s, Schedule) and s.last_batch_iteration == 0
    seq = []
    for i in range(40):
        assert s.last_batch_iteration == i
        seq.append((s.get_last_lr(), s.momentum_at(s.last_batch_iteration)))
        s.step()
    assert [lr for lr, _ in seq] == [[s.lr_at(i)] for i in range(40)]
    # save mid-run, resume in a fresh schedule: the same sequence continues
    s = make_schedule(cfg)
    for _ in range(17):
        s.step()
    sd = s.state_dict()
    assert sd == {"last_batch_iteration": 17}
    resumed = make_schedule(cfg)
    resumed.load_state_dict(sd)
    for i in range(17, 40):
        assert (resumed.get_last_lr(), resumed.momentum_at(i)) == seq[i]
        resumed.step()


def test_step_jump_start_and_bad_values():
    s = make_schedule(ALL_CONFIGS[0], last_batch_iteration=-1)  # DeepSpeed's "not started"
    assert s.get_last_lr() == [0.0]
    s.step(25)
    assert s.last_batch_iteration == 25 and s.get_last_lr() == [s.lr_at(25)]
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match="last_batch_iteration"):
            s.step(bad)
        with pytest.raises(ValueError, match="last_batch_iteration"):
            s.lr_at(bad)
    with pytest.raises(ConfigError, match="last_batch_iteration"):
        s.load_state_dict({"step": 3})


# ---- the config's schedule, stepped by the runtime itself --------------------------------
def _warmup(cfg_extra=None, fp16=None):
    from models import make

    cfg = {"train_micro_batch_size_per_gpu": 8,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0,
                                                        "warmup_max_lr": 1e-2,
                                                        "warmup_num_steps": 5}}}
    if fp16 is not None:
        cfg["fp16"] = fp16
    model, _ = make("mlp")
    return model, cfg


def _warmup_lr_at(it):  # DeepSpeed's WarmupLR (log warmup by default) at iteration it
    import math

    if it < 0:
        return 0.0
    gamma = math.log(it + 1) / math.log(5) if it < 5 else 1.0
    return 1e-2 * min(gamma, 1.0)


def test_a_bare_runtime_applies_the_configs_schedule(no_torchrun_env):
    import zerofx
    from models import mlp_batch

    model, cfg = _warmup()
    rt = zerofx.ZeroRuntime(model, cfg)  # no engine: the runtime steps the schedule
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    used = []
    for k in range(7):
        used.append(float(rt.state.lr))
        compiled(*mlp_batch(seed=k)).backward()
        rt.step()
    # DeepSpeed's timing: the k-th step (k >= 1) runs with lr_at(k - 2), the first two at min
    assert used == pytest.approx([_warmup_lr_at(k - 1) if k else 0.0 for k in range(7)])
    assert used[-1] > 0


def _overflowing_run(steps):
    import zerofx
    from models import mlp_batch

    # a loss scale of 2**32 overflows fp16 gradients: the first steps are skipped
    model, cfg = _warmup(fp16={"enabled": True, "initial_scale_power": 32,
                               "loss_scale_window": 1000, "hysteresis": 1})
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    for k in range(steps):
        x, y = mlp_batch(seed=k)
        rt.backward(compiled(x.half(), y.half()))
        rt.step()
    return rt


def test_a_skipped_step_does_not_advance_the_schedule(no_torchrun_env):
    # DeepSpeed (_take_model_step): on overflow the lr scheduler is not stepped
    rt = _overflowing_run(22)
    skipped = rt.skipped_steps
    assert 0 < skipped < 22
    applied = 22 - skipped
    assert rt.schedule.last_batch_iteration == applied - 1
    assert float(rt.state.lr) == pytest.approx(_warmup_lr_at(applied - 1), rel=1e-6)


@pytest.mark.parametrize("given", [False, True])
def test_the_engine_follows_deepspeed_on_skipped_steps(no_torchrun_env, given):
    # the config's schedule, or one given to initialize (DeepSpeed's client scheduler): both
    # stay put on an overflow step
    import zerofx
    from models import mlp_batch

    model, cfg = _warmup(fp16={"enabled": True, "initial_scale_power": 32,
                               "loss_scale_window": 1000, "hysteresis": 1})
    sched = None
    if given:
        from zerofx.config import Config

        sched = make_schedule(Config.from_dict(cfg).scheduler, last_batch_iteration=-1)
        del cfg["scheduler"]
    engine, _, _, used = zerofx.initialize(model=model, config=cfg, lr_scheduler=sched)
    for k in range(22):
        x, y = mlp_batch(seed=k)
        engine.backward(engine(x.half(), y.half()))
        engine.step()
    applied = 22 - engine.skipped_steps
    assert 0 < engine.skipped_steps < 22
    assert used.last_batch_iteration == applied - 1
    assert engine.get_lr()[0] == pytest.approx(_warmup_lr_at(applied - 1), rel=1e-6)
