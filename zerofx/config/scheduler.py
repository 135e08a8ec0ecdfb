"""The "scheduler" block of the config: DeepSpeed's five LR schedules and their parameters.

Part of zerofx.config (which re-exports these names): typed, validated dataclasses whose
attribute names are DeepSpeed's JSON keys; zerofx/lr_schedules.py computes the schedules.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from zerofx.config.schema import (
    bad, boolean, check_keys, checked, choice, integer, json_object, key_error, number,
    optional, parse_block, parse_in, required_keys, required_setting, setting, validate,
)

# The largest learning rate any block accepts (a huge lr gives NaN parameters).
MAX_LR = 1e3
# The largest step count a schedule takes: the schedules compute in floats, exact to 2**53
# (10**400 steps was an OverflowError at the first step, not a config error).
MAX_STEPS = 2**53
# Post-cycle decay rates (OneCycle): per decay interval; 1e300 made the lr 0 and beta1 inf.
MAX_DECAY_RATE = 1e3
# LRRangeTest's growth per interval: bounded so that lr_range_test_min_lr x (1 + rate x
# steps) stays a float32 (the step graph's lr) up to MAX_STEPS; 1e300 overflowed it.
MAX_STEP_RATE = 1e6

_STEPS = integer(1, MAX_STEPS, ceiling="at most 2**53, where the schedules' float math "
                                      "stops being exact")
_STAIRS = integer(0, MAX_STEPS, ceiling="at most 2**53, where the schedules' float math "
                                       "stops being exact")
# beta1 = 1 divides by zero in Adam's bias correction 1 - beta1**t (without it, the first
# moment never moves)
_MOMENTUM = number(0.0, 1.0, hi_open=True, why="beta1 = 1 zeroes Adam's bias correction")
_DECAY_RATE = number(0.0, MAX_DECAY_RATE, why="a rate per decay_step_size steps")


@dataclass(frozen=True, kw_only=True)
class WarmupLRParams:
    """DeepSpeed WarmupLR: lr rises from min to max over warmup_num_steps, then stays."""

    warmup_min_lr: float = setting(0.0, number(0.0, MAX_LR))
    """Learning rate at step 0."""
    warmup_max_lr: float = setting(0.001, number(0.0, MAX_LR))
    """Learning rate reached at the end of warmup."""
    warmup_num_steps: int = setting(1000, _STEPS)
    """Length of the warmup in optimizer steps."""
    warmup_type: str = setting("log", choice("log", "linear"))
    """Shape of the rise: "log" or "linear"."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, kw_only=True)
class WarmupDecayLRParams(WarmupLRParams):
    """DeepSpeed WarmupDecayLR: WarmupLR, then linear decay to 0 at total_num_steps."""

    total_num_steps: int = required_setting(_STEPS)
    """Step at which the learning rate reaches 0 (required)."""


@dataclass(frozen=True, kw_only=True)
class OneCycleParams:
    """DeepSpeed OneCycle: one triangular lr (and momentum) cycle, then optional decay."""

    cycle_min_lr: float = required_setting(number(0.0, MAX_LR))
    """Learning rate at the start and end of the cycle (required)."""
    cycle_max_lr: float = required_setting(number(0.0, MAX_LR))
    """Learning rate at the peak of the cycle (required)."""
    decay_lr_rate: float = setting(0.0, _DECAY_RATE)
    """Learning rate decay rate after the cycle."""
    cycle_first_step_size: int = setting(2000, _STEPS)
    """Steps in the rising half of the cycle."""
    cycle_second_step_size: int | None = setting(None, optional(_STEPS))
    """Steps in the falling half (None: same as the rising half)."""
    cycle_first_stair_count: int = setting(0, _STAIRS)
    """Stairs in the rising half (0: continuous)."""
    cycle_second_stair_count: int | None = setting(None, optional(_STAIRS))
    """Stairs in the falling half (None: same as the rising half)."""
    decay_step_size: int = setting(0, _STAIRS)
    """Steps between decays after the cycle (0: no decay)."""
    cycle_momentum: bool = setting(True, boolean)
    """Cycle beta1 inversely to the learning rate."""
    cycle_min_mom: float = setting(0.8, _MOMENTUM)
    """Lowest beta1 of the cycle."""
    cycle_max_mom: float = setting(0.9, _MOMENTUM)
    """Highest beta1 of the cycle."""
    decay_mom_rate: float = setting(0.0, _DECAY_RATE)
    """Momentum "decay" rate after the cycle: DeepSpeed's formula makes beta1 grow by it
    (zerofx.lr_schedules warns at the step where beta1 would reach 1)."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, kw_only=True)
class LRRangeTestParams:
    """DeepSpeed LRRangeTest: lr grows from lr_range_test_min_lr to find a usable maximum."""

    lr_range_test_min_lr: float = setting(1e-3, number(0.0, MAX_LR))
    """Starting learning rate."""
    lr_range_test_step_size: int = setting(2000, _STEPS)
    """Steps per increase interval."""
    lr_range_test_step_rate: float = setting(1.0, number(
        0.0, MAX_STEP_RATE, why="the lr grows by min_lr x rate per interval and must stay a "
                                "float32"))
    """Increase per interval, as a fraction of the starting learning rate."""
    lr_range_test_staircase: bool = setting(False, boolean)
    """Increase in steps instead of continuously."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, kw_only=True)
class WarmupCosineLRParams:
    """DeepSpeed WarmupCosineLR: a ratio of the optimizer's own lr, rising from
    warmup_min_ratio to 1 over warmup_num_steps, then a cosine down to cos_min_ratio at
    total_num_steps (and held there)."""

    total_num_steps: int = required_setting(_STEPS)
    """Step at which the cosine reaches cos_min_ratio (required)."""
    warmup_min_ratio: float = setting(0.0, number(0.0, 1.0))
    """Ratio of the optimizer's lr at step 0."""
    warmup_num_steps: int = setting(1000, _STEPS)
    """Length of the warmup in optimizer steps."""
    cos_min_ratio: float = setting(0.0001, number(0.0, 1.0))
    """Ratio of the optimizer's lr at the end of the cosine."""
    warmup_type: str = setting("log", choice("log", "linear"))
    """Shape of the rise: "log" or "linear"."""

    def __post_init__(self) -> None:
        validate(self)


SchedulerParams = (WarmupLRParams | WarmupDecayLRParams | OneCycleParams | LRRangeTestParams
                   | WarmupCosineLRParams)
_SCHEDULES: dict[str, type] = {
    "WarmupLR": WarmupLRParams, "WarmupDecayLR": WarmupDecayLRParams,
    "OneCycle": OneCycleParams, "LRRangeTest": LRRangeTestParams,
    "WarmupCosineLR": WarmupCosineLRParams,
}


@dataclass(frozen=True)
class SchedulerConfig:
    """DeepSpeed's "scheduler" block: {"type": ..., "params": {...}}."""

    type: str = required_setting(choice(*_SCHEDULES))
    """"WarmupLR", "WarmupDecayLR", "OneCycle", "LRRangeTest" or "WarmupCosineLR"."""
    params: SchedulerParams | None = None
    """The typed parameters for `type` (None: that type's defaults)."""

    def __post_init__(self) -> None:
        validate(self)
        want = _SCHEDULES[self.type]
        if self.params is None:
            missing = required_keys(want)
            if missing:
                raise key_error(f"params.{missing[0]}",
                                f" is required for scheduler type {self.type}")
            object.__setattr__(self, "params", want())
        if type(self.params) is not want:
            raise bad("params", self.params, f"a {want.__name__} for type {self.type}")


def parse_scheduler(raw: Any) -> SchedulerConfig | None:
    if raw is None:
        return None
    block = json_object(raw)
    check_keys(block, ("type", "params"), required=("type",))
    kind = checked("type", block["type"], choice(*_SCHEDULES))
    params = parse_in("params", partial(parse_block, _SCHEDULES[kind]), block.get("params", {}))
    return SchedulerConfig(type=kind, params=params)
