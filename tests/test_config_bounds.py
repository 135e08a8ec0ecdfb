"""Bounds on what a config may say (reliability issue, items 6 and 7).

Item 6: a number outside what training can use is a ConfigError at load, naming the key, the
value and the allowed range, where it used to load and make every parameter NaN, stop the
updates or fail mid-training (gradient_predivide_factor 1e300, OneCycle cycle_min_lr 1e30,
lr_range_test_step_rate 1e300, gradient_clipping 1e-300, ...). Item 7: the config file itself
is bounded: a FIFO or a device is refused before it is read, a file over the size cap is
refused unread, the duplicate-key scan costs no memory per element, and no error message
copies a huge key or value.
"""
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerofx.config import MAX_LR, Config, ConfigError, SchedulerConfig
from zerofx.lr_schedules import make_schedule

REPO = Path(__file__).resolve().parents[1]
F32 = np.finfo(np.float32)
MAX_STEPS = 2**53  # the largest step count a schedule takes (exact in the floats it computes)
MAX_CONFIG_BYTES = 16 << 20  # the config file size cap

# ---- item 6: every number has a range ------------------------------------------------------


def _sched(kind, **params):
    return {"scheduler": {"type": kind, "params": params}}


def _opt(kind, **params):
    return {"optimizer": {"type": kind, "params": params}}


ONE_CYCLE = dict(cycle_min_lr=1e-4, cycle_max_lr=1e-2)

# (config, dotted key it must name, the value as the message shows it)
OUT_OF_RANGE = [
    ({"gradient_predivide_factor": 1e300}, "gradient_predivide_factor", "1e+300"),
    ({"gradient_predivide_factor": 1e-300}, "gradient_predivide_factor", "1e-300"),
    ({"gradient_clipping": 1e-300}, "gradient_clipping", "1e-300"),
    ({"gradient_clipping": 1e300}, "gradient_clipping", "1e+300"),
    (_sched("OneCycle", cycle_min_lr=1e30, cycle_max_lr=1e-2),
     "scheduler.params.cycle_min_lr", "1e+30"),
    (_sched("LRRangeTest", lr_range_test_step_rate=1e300),
     "scheduler.params.lr_range_test_step_rate", "1e+300"),
    (_sched("OneCycle", decay_lr_rate=1e300, **ONE_CYCLE),
     "scheduler.params.decay_lr_rate", "1e+300"),
    (_sched("OneCycle", decay_mom_rate=1e300, **ONE_CYCLE),
     "scheduler.params.decay_mom_rate", "1e+300"),
    # beta1 = 1: Adam's bias correction 1 - beta1**t is 0 (NaN), or the moment never moves
    (_sched("OneCycle", cycle_max_mom=1.0, **ONE_CYCLE), "scheduler.params.cycle_max_mom", "1.0"),
    (_sched("OneCycle", cycle_min_mom=1.0, **ONE_CYCLE), "scheduler.params.cycle_min_mom", "1.0"),
    # step counts the schedules turn into floats: 10**400 was an OverflowError mid-training
    (_sched("WarmupLR", warmup_num_steps=10**400), "scheduler.params.warmup_num_steps", "1000"),
    (_sched("WarmupDecayLR", total_num_steps=10**400), "scheduler.params.total_num_steps",
     "1000"),
    (_sched("OneCycle", cycle_first_step_size=10**400, **ONE_CYCLE),
     "scheduler.params.cycle_first_step_size", "1000"),
    (_sched("OneCycle", cycle_second_step_size=10**400, **ONE_CYCLE),
     "scheduler.params.cycle_second_step_size", "1000"),
    (_sched("OneCycle", decay_step_size=10**400, **ONE_CYCLE),
     "scheduler.params.decay_step_size", "1000"),
    (_sched("OneCycle", cycle_first_stair_count=10**400, **ONE_CYCLE),
     "scheduler.params.cycle_first_stair_count", "1000"),
    (_sched("LRRangeTest", lr_range_test_step_size=10**400),
     "scheduler.params.lr_range_test_step_size", "1000"),
    # float32 rounds eps 1e300 to inf (no update) and 1e-300 or 0 to 0 (0/0 for a zero gradient)
    (_opt("AdamW", eps=1e300), "optimizer.params.eps", "1e+300"),
    (_opt("AdamW", eps=1e-300), "optimizer.params.eps", "1e-300"),
    (_opt("AdamW", eps=0.0), "optimizer.params.eps", "0.0"),
    (_opt("AdamW", weight_decay=1e300), "optimizer.params.weight_decay", "1e+300"),
    (_opt("Lamb", max_coeff=1e-300), "optimizer.params.max_coeff", "1e-300"),
    (_opt("Lamb", max_coeff=1e300, min_coeff=1e300), "optimizer.params.max_coeff", "1e+300"),
    ({"fp16": {"enabled": True, "min_loss_scale": 1e-300}}, "fp16.min_loss_scale", "1e-300"),
    # the loss scaler keeps these in int64 tensors: beyond, a raw overflow at the first step
    ({"fp16": {"enabled": True, "loss_scale_window": 2**70}}, "fp16.loss_scale_window",
     str(2**70)),
    ({"fp16": {"enabled": True, "hysteresis": 2**70}}, "fp16.hysteresis", str(2**70)),
]


@pytest.mark.parametrize("cfg,key,shown", OUT_OF_RANGE, ids=[k for _, k, _ in OUT_OF_RANGE])
def test_numbers_out_of_range_are_config_errors_naming_key_value_and_range(cfg, key, shown):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(cfg)
    text = str(info.value)
    assert info.value.key == key, text
    assert f"'{key}'" in text and shown in text, text
    assert "expected" in text and ("[" in text or "(" in text), text  # the allowed range
    assert len(text) < 400, text


# DeepSpeed's documented examples and common practice: all of them load.
REALISTIC = [
    {"gradient_predivide_factor": f} for f in (1.0, 2, 8, 64, 1e4)
] + [
    {"gradient_clipping": c} for c in (0, 0.0, 0.1, 0.5, 1.0, 10)
] + [
    _sched("LRRangeTest", lr_range_test_min_lr=1e-4, lr_range_test_step_size=200,
           lr_range_test_step_rate=r) for r in (1e-3, 0.5, 5, 10)
] + [
    _sched("OneCycle", cycle_min_lr=1e-4, cycle_max_lr=1e-2, decay_lr_rate=1e-3,
           decay_mom_rate=0.0, decay_step_size=1000, cycle_first_step_size=1e3,
           cycle_min_mom=0.85, cycle_max_mom=0.99),
    _sched("WarmupDecayLR", warmup_min_lr=0, warmup_max_lr=3e-4, warmup_num_steps=1000,
           total_num_steps=1e6),
    _opt("Lamb", lr=1e-3, eps=1e-6, weight_decay=0.01, max_coeff=10.0, min_coeff=0.01),
    _opt("AdamW", lr=3e-4, eps=1e-8, weight_decay=0.1, betas=[0.9, 0.95]),
    {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
              "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}},
    {"fp16": {"enabled": True, "loss_scale": 128, "min_loss_scale": 1e-4}},
]


@pytest.mark.parametrize("cfg", REALISTIC, ids=lambda c: json.dumps(c)[:60])
def test_realistic_configs_still_load(cfg):
    Config.from_dict(cfg)


def test_bounds_themselves_load_and_give_finite_lrs_at_the_last_step():
    """The extremes that load: every lr is finite and fits the step graph's float32 lr."""
    cases = [
        _sched("LRRangeTest", lr_range_test_min_lr=MAX_LR, lr_range_test_step_size=1,
               lr_range_test_step_rate=1e6),
        _sched("OneCycle", cycle_min_lr=MAX_LR, cycle_max_lr=MAX_LR, cycle_first_step_size=1,
               decay_step_size=1, decay_lr_rate=1e3, decay_mom_rate=1e3),
        _sched("WarmupDecayLR", warmup_max_lr=MAX_LR, warmup_num_steps=MAX_STEPS,
               total_num_steps=MAX_STEPS),
    ]
    for cfg in cases:
        schedule = make_schedule(Config.from_dict(cfg).scheduler)
        for step in (0, 1, 10**6, MAX_STEPS):
            lr, mom = schedule.lr_at(step), schedule.momentum_at(step)
            assert math.isfinite(lr) and 0 <= lr <= F32.max, (cfg, step, lr)
            assert mom is None or math.isfinite(mom), (cfg, step, mom)


def test_a_step_count_past_the_bound_is_refused_where_it_enters():
    """A checkpoint's last_batch_iteration of 10**400 was accepted and made lr_at raise
    OverflowError at the next step; now loading it names the key."""
    schedule = make_schedule(SchedulerConfig(type="WarmupLR"))
    with pytest.raises(ValueError, match="last_batch_iteration"):
        schedule.load_state_dict({"last_batch_iteration": 10**400})
    with pytest.raises(ValueError, match="last_batch_iteration"):
        schedule.step(MAX_STEPS + 1)


def test_one_cycle_says_when_its_decayed_momentum_passes_one(caplog):
    """DeepSpeed's post-cycle momentum grows as max_mom * (1 + rate * interval) and passes 1,
    where Adam diverges; the formula stays DeepSpeed's, the step where it happens is said."""
    cfg = _sched("OneCycle", cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=10,
                 decay_step_size=5, decay_mom_rate=0.01, cycle_max_mom=0.9)
    with caplog.at_level(logging.WARNING, logger="zerofx.lr_schedules"):
        schedule = make_schedule(Config.from_dict(cfg).scheduler)
    message = caplog.text
    assert "decay_mom_rate" in message and "beta1" in message, message
    at = int(message.split("at step ")[1].split()[0].rstrip(",;:"))
    assert schedule.momentum_at(at - 1) < 1.0 <= schedule.momentum_at(at), at


# ---- the property: whatever loads gives usable numbers -------------------------------------

# Any float, weighted toward the extremes, plausible magnitudes (10**-40..10**40) and values
# that load (so the property is not vacuous).
FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                  st.floats(-40, 40).map(lambda e: 10.0 ** e), st.floats(0, 10),
                  st.sampled_from([0.0, 1e-300, 1e300, 1e-6, 1e6, 1e3, 1e4, 0.999999, 1.0]))
STEPS = st.one_of(st.integers(1, 2**70), st.integers(1, 5000), st.sampled_from([MAX_STEPS]))
STAIRS = st.one_of(st.integers(0, 2**70), st.integers(0, 10))

SCHEDULES = st.one_of(
    st.fixed_dictionaries({"type": st.just("LRRangeTest"), "params": st.fixed_dictionaries(
        {}, optional={"lr_range_test_min_lr": FLOAT, "lr_range_test_step_rate": FLOAT,
                      "lr_range_test_step_size": STEPS,
                      "lr_range_test_staircase": st.booleans()})}),
    st.fixed_dictionaries({"type": st.just("OneCycle"), "params": st.fixed_dictionaries(
        {"cycle_min_lr": FLOAT, "cycle_max_lr": FLOAT},
        optional={"decay_lr_rate": FLOAT, "decay_mom_rate": FLOAT, "cycle_min_mom": FLOAT,
                  "cycle_max_mom": FLOAT, "cycle_first_step_size": STEPS,
                  "cycle_second_step_size": STEPS, "decay_step_size": STEPS,
                  "cycle_first_stair_count": STAIRS, "cycle_second_stair_count": STAIRS})}),
    st.fixed_dictionaries({"type": st.sampled_from(["WarmupLR", "WarmupDecayLR"]),
                           "params": st.fixed_dictionaries(
        {"total_num_steps": STEPS},
        optional={"warmup_min_lr": FLOAT, "warmup_max_lr": FLOAT, "warmup_num_steps": STEPS,
                  "warmup_type": st.sampled_from(["log", "linear"])})}),
)
# Every step up to 2000, then every 997th to 10**6, and the last step a schedule may reach.
STEPS_CHECKED = [*range(-1, 2000), *range(2000, 10**6 + 1, 997), 10**6, MAX_STEPS]


def _loads(cfg):
    try:
        return Config.from_dict(cfg)
    except ConfigError as e:
        text = str(e)
        assert e.key is not None and f"'{e.key}'" in text and len(text) < 400, text
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=SCHEDULES, extra=st.lists(st.integers(0, 10**6), max_size=20))
def test_any_schedule_that_loads_gives_finite_float32_lrs_over_a_million_steps(raw, extra):
    if raw["type"] == "WarmupLR":
        raw["params"].pop("total_num_steps")
    cfg = _loads({"scheduler": raw})
    if cfg is None:
        return
    schedule = make_schedule(cfg.scheduler, last_batch_iteration=-1)
    for step in STEPS_CHECKED + extra:
        lr = schedule.lr_at(step)
        # the engine writes it into the step graph's float32 lr: finite there too
        assert math.isfinite(lr) and 0 <= lr <= F32.max, (step, lr)
        mom = schedule.momentum_at(step)
        assert mom is None or (math.isfinite(mom) and mom >= 0), (step, mom)


SCALES = st.fixed_dictionaries({}, optional={
    "gradient_predivide_factor": FLOAT, "gradient_clipping": FLOAT,
    "optimizer": st.fixed_dictionaries({"type": st.just("Lamb"), "params": st.fixed_dictionaries(
        {}, optional={"eps": FLOAT, "weight_decay": FLOAT, "max_grad_norm": FLOAT,
                      "max_coeff": FLOAT, "min_coeff": FLOAT})}),
    "fp16": st.fixed_dictionaries({"enabled": st.just(True)},
                                  optional={"min_loss_scale": FLOAT, "loss_scale": FLOAT}),
})


def _f32(x):
    return torch.tensor(x, dtype=torch.float32)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=SCALES)
def test_any_scale_that_loads_is_finite_and_nonzero_in_float32(raw):
    """The factors step_fn and grad_intake compute from these keys, computed as they do."""
    cfg = _loads(raw)
    if cfg is None:
        return
    pre = cfg.pre_reduce_factor  # gradients x pre before the reduction, / (dp*gas*pre) after
    for dp_gas in (1, 8, 2**31):
        for v in (_f32(pre), 1.0 / (_f32(pre) * dp_gas)):
            assert torch.isfinite(v) and v >= F32.tiny, (pre, dp_gas, v)
    clips = [c for c in (cfg.clip_norm,) if c]
    for clip in clips:  # the clip coefficient of a global norm, as step_fn computes it
        for norm in (1e-3, 1.0, 1e6, 1e30):
            coef = torch.clamp(_f32(clip) / (_f32(norm) + 1e-6), max=1.0)
            assert torch.isfinite(coef) and coef * norm >= min(clip, norm) * 0.99, (clip, norm)
    if cfg.optimizer is not None:
        opt = cfg.optimizer
        for v in (opt.eps, opt.weight_decay, opt.max_coeff, opt.min_coeff):
            assert torch.isfinite(_f32(v)), opt
        # Adam/LAMB's denominator for an element whose gradient is 0: 0 / (0 + eps) = 0
        assert _f32(0.0) / (_f32(0.0).sqrt() + _f32(opt.eps)) == 0, opt.eps
        assert _f32(opt.max_coeff) > 0, opt.max_coeff
    fp16 = cfg.fp16
    assert 2.0**-24 <= float(_f32(fp16.min_loss_scale)) < math.inf, fp16


# ---- item 7: the config file -------------------------------------------------------------

LOAD = ("import sys\n"
        "from zerofx.config import Config, ConfigError\n"
        "try:\n"
        "    Config.from_file(sys.argv[1])\n"
        "except ConfigError as e:\n"
        "    print('ConfigError:', e)\n")


def _load_in_child(path, timeout=20):
    """Config.from_file(path) in a child process with 1 GiB of address space, so a load that
    blocks or reads without end fails this test instead of hanging or exhausting the host."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    try:
        done = subprocess.run([sys.executable, "-c", LOAD, str(path)], cwd=REPO, timeout=timeout,
                              capture_output=True, text=True, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path} did not return within {timeout} s")
    return (done.stdout + done.stderr).strip()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "ds_config.json"
    os.mkfifo(fifo)
    out = _load_in_child(fifo)
    assert out.startswith("ConfigError:") and "not a regular file" in out and "FIFO" in out, out


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_is_refused_without_reading_it():
    out = _load_in_child("/dev/zero")
    assert out.startswith("ConfigError:") and "not a regular file" in out, out


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        Config.from_file(tmp_path)


def test_a_file_over_the_cap_is_refused_unread(tmp_path):
    path = tmp_path / "ds_config.json"
    with open(path, "wb") as fh:
        fh.truncate(MAX_CONFIG_BYTES + 1)  # sparse: no disk, but its size is over the cap
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            Config.from_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert "16 MiB" in text and str(MAX_CONFIG_BYTES + 1) in text, text
    assert peak < 1 << 20, peak  # refused from its size, not after reading it


def test_a_file_at_the_cap_loads(tmp_path):
    path = tmp_path / "ds_config.json"
    body = b'{"train_batch_size": 8}'
    path.write_bytes(body + b" " * (MAX_CONFIG_BYTES - len(body)))
    assert Config.from_file(path).train_batch_size == 8


def _measure(fn):
    """(exception, seconds, peak traced bytes) of fn()."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the caller checks what it was
        error = e
    else:
        error = None
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, seconds, peak


@pytest.mark.slow  # ~10 s: parses a 10 MB file under tracemalloc
def test_a_10mb_array_costs_little_beyond_itself(tmp_path):
    """The duplicate-key scan used to make a tuple and a path string per element: 1.15 GB and
    49 s (traced) for this file."""
    path = tmp_path / "ds_config.json"
    path.write_text('{"x": [' + ",".join(["0"] * 5_000_000) + "]}")  # 10 MB, 5M elements
    error, seconds, peak = _measure(lambda: Config.from_file(path))
    assert isinstance(error, ConfigError) and "'x'" in str(error), error
    assert peak < 200 << 20, f"{peak / 2**20:.0f} MiB"
    assert seconds < 20, seconds


def test_a_duplicate_deep_in_a_big_file_is_still_found_by_path(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text('{"a": [' + ",".join(["0"] * 100_000) + ', {"b": {"c": 1, "c": 2}}]}')
    with pytest.raises(ConfigError, match=r"'a\[100000\]\.b\.c' appears twice"):
        Config.from_file(path)


HUGE = "k" * 10_000_000


@pytest.mark.parametrize("text", [
    json.dumps({HUGE: 1}),                                           # an unknown key
    json.dumps({"optimizer": {"type": "Adam", "params": {HUGE: 1}}}),  # one, nested
    '{"%s": 1, "%s": 2}' % ((HUGE[:5_000_000],) * 2),                # a duplicate (2 x 5 MB)
    json.dumps({"zero_optimization": {"stage": 1, HUGE: "auto"}}),   # an "auto" placeholder
    json.dumps({"compile": HUGE}),                                   # a refused block's value
], ids=["unknown", "nested", "duplicate", "auto", "refused"])
def test_a_10mb_key_or_value_is_not_copied_into_the_message(tmp_path, text):
    path = tmp_path / "ds_config.json"
    path.write_text(text)
    error, seconds, peak = _measure(lambda: Config.from_file(path))
    assert isinstance(error, ConfigError), error
    message = str(error)
    # the path, the key cut to 80 characters and the list of valid keys: far under 1 KiB
    # beside the 10 MB key, whatever keys the config grows
    assert len(message) < 1000 and "kkk..." in message, message[:1000]
    assert seconds < 10, seconds
    assert peak < 200 << 20, f"{peak / 2**20:.0f} MiB"  # no difflib index over the key


def test_a_10mb_key_in_a_dict_is_not_copied_either():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"fp16": {HUGE: 1}})
    assert len(str(info.value)) < 1000 and "'fp16.kkk" in str(info.value)
