"""Hostile configs through zerofx.initialize (not only Config): random DeepSpeed-shaped dicts
whose values are anything JSON can hold plus NaN, inf and huge integers. The property: a
ConfigError (one clear message), or an engine whose numbers are all usable: a finite
learning rate at every early step of its schedule and a representable loss scale.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zerofx
from zerofx.config.schema import ConfigError
from zerofx.lr_schedules import Schedule

ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                st.just("auto"), st.lists(st.integers(-3, 3), max_size=3))
# Numbers are the usual culprits: weighted toward them, including plausible ones.
NUM = st.one_of(st.integers(-2, 2**63), st.floats(allow_nan=True, allow_infinity=True),
                st.sampled_from([0, 1, 2, 8, 1e-300, 1e300, 2**31, 2**63, 1e-3, 0.9]), ANY)


def _block(keys, **fixed):
    return st.fixed_dictionaries(fixed, optional={k: NUM for k in keys})


CONFIGS = st.fixed_dictionaries({}, optional={
    "train_batch_size": NUM, "train_micro_batch_size_per_gpu": NUM,
    "gradient_accumulation_steps": NUM, "gradient_clipping": NUM, "steps_per_print": NUM,
    "prescale_gradients": ANY, "gradient_predivide_factor": NUM,
    "optimizer": st.fixed_dictionaries(
        {"type": st.sampled_from(["Adam", "AdamW", "Lamb", "lamb", "SGD", "x"])},
        optional={"params": st.fixed_dictionaries({}, optional={
            "lr": NUM, "eps": NUM, "weight_decay": NUM, "max_coeff": NUM,
            "betas": st.lists(NUM, max_size=3)})}),
    "scheduler": st.fixed_dictionaries(
        {"type": st.sampled_from(["WarmupLR", "WarmupDecayLR", "OneCycle", "LRRangeTest",
                                  "WarmupCosineLR"])},
        optional={"params": _block(["warmup_min_lr", "warmup_max_lr", "warmup_num_steps",
                                    "total_num_steps", "cycle_min_lr", "cycle_max_lr",
                                    "cycle_first_step_size", "lr_range_test_min_lr",
                                    "lr_range_test_step_size", "lr_range_test_step_rate",
                                    "warmup_min_ratio", "cos_min_ratio"])}),
    "fp16": _block(["loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                    "min_loss_scale"], enabled=st.booleans()),
    "bf16": st.fixed_dictionaries({"enabled": ANY}),
    "zero_optimization": _block(["stage", "reduce_bucket_size", "allgather_bucket_size",
                                 "overlap_comm"]),
})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=CONFIGS)
def test_initialize_refuses_cleanly_or_builds_a_usable_engine(cfg, no_torchrun_env):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    try:
        engine, _, _, scheduler = zerofx.initialize(model=model, config=cfg)
    except ConfigError as e:
        text = str(e)
        assert text and "\n" not in text.strip() and "Traceback" not in text, text
        return
    scale = float(engine.runtime.state.scaler.scale)
    assert math.isfinite(scale) and 0 < scale <= 2.0**127, scale
    if isinstance(scheduler, Schedule):
        # DeepSpeed's LR range test raises the lr without bound by design (until the loss
        # diverges): finite and non-negative; every other schedule stays within its bounds
        rising = cfg["scheduler"]["type"] == "LRRangeTest"
        for step in range(0, 50):
            lr = scheduler.lr_at(step)
            assert math.isfinite(lr) and 0 <= lr and (rising or lr <= 1e3), (step, lr)


def test_the_fuzzer_reaches_engines_too(no_torchrun_env):
    """The property above is vacuous if every draw is refused: a plain draw builds."""
    model = torch.nn.Linear(4, 1)
    engine, *_ = zerofx.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam",
                                                           "params": {"lr": 1e-3}}})
    assert engine.runtime is not None


pytestmark = pytest.mark.filterwarnings("ignore")
