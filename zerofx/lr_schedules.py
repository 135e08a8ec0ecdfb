"""DeepSpeed's learning-rate schedules (WarmupLR, WarmupDecayLR, OneCycle, LRRangeTest,
WarmupCosineLR).

Each schedule is a pure function of the step count, `lr_at(step)`, plus a counter. The formulas
are DeepSpeed's `deepspeed/runtime/lr_schedules.py` as of 0.19 (which has `warmup_type`, the
`max(2, warmup_num_steps)` clamp, OneCycle's +1 offsets and its stairs), computed in the same
operation order so that values agree to the last bit.

Step convention: `step` is DeepSpeed's `last_batch_iteration`, and `lr_at(step)` is what
DeepSpeed's `get_lr()` returns when `last_batch_iteration == step`. By default a schedule starts
at 0, so the first optimizer step uses `lr_at(0)` and `step()` after each optimizer step
advances it. DeepSpeed itself starts at -1 (its constructor puts `lr_at(-1)` into the optimizer
and does not step), so its k-th optimizer step uses `lr_at(k - 1)`: pass
`last_batch_iteration=-1` to `make_schedule` for that exact timing.

The lr is a plain float: the engine copies it into the step graph's lr tensor input, so a
changing lr never recompiles (docs/design.md: "state that changes every step"). The config's
bounds (zerofx/config/scheduler.py) keep every lr a finite float32 up to step MAX_STEPS;
OneCycle's post-cycle momentum keeps DeepSpeed's growing formula and warns where it reaches 1.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from zerofx.config import (MAX_STEPS, ConfigError, LRRangeTestParams, OneCycleParams,
                           SchedulerConfig, WarmupCosineLRParams, WarmupDecayLRParams,
                           WarmupLRParams)

log = logging.getLogger(__name__)

__all__ = ["LRRangeTest", "OneCycle", "Schedule", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR",
           "make_schedule"]


class Schedule:
    """A step counter over a pure `lr_at(step)`; the DeepSpeed scheduler surface."""

    def __init__(self, *, last_batch_iteration: int = 0) -> None:
        self._step = _check_step(last_batch_iteration)

    def lr_at(self, step: int) -> float:
        """The learning rate when `last_batch_iteration == step` (step >= -1)."""
        raise NotImplementedError

    def momentum_at(self, step: int) -> float | None:
        """Adam's beta1 at `step`, or None where the schedule leaves momentum alone."""
        return None

    @property
    def last_batch_iteration(self) -> int:
        return self._step

    def step(self, batch_iteration: int | None = None) -> None:
        """Advance by one, or jump to `batch_iteration` (DeepSpeed's optional argument)."""
        self._step = _check_step(self._step + 1 if batch_iteration is None else batch_iteration)

    def get_last_lr(self) -> list[float]:
        """The current lr, one entry per param group (zerofx has one schedule for all)."""
        return [self.lr_at(self._step)]

    def state_dict(self) -> dict[str, Any]:
        # DeepSpeed's checkpoint key, so checkpoints move between the two both ways
        return {"last_batch_iteration": self._step}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if "last_batch_iteration" not in d:
            raise ConfigError("scheduler state has no 'last_batch_iteration'; "
                              f"got keys {sorted(d)}")
        self._step = _check_step(d["last_batch_iteration"])


def _check_step(step: Any) -> int:
    # -1 is DeepSpeed's "not started"; anything below is a caller bug, not a schedule value.
    # Above MAX_STEPS (a corrupt checkpoint), the float arithmetic of lr_at would overflow.
    if isinstance(step, bool) or not isinstance(step, int) or not -1 <= step <= MAX_STEPS:
        shown = step if isinstance(step, int) and step.bit_length() < 200 else type(step)
        raise ValueError(f"last_batch_iteration must be an int in [-1, 2**53]; got {shown!r}")
    return step


class WarmupLR(Schedule):
    """lr rises from warmup_min_lr to warmup_max_lr over warmup_num_steps, then stays."""

    def __init__(self, p: WarmupLRParams, *, last_batch_iteration: int = 0) -> None:
        super().__init__(last_batch_iteration=last_batch_iteration)
        self.min_lr = p.warmup_min_lr
        self.delta_lr = p.warmup_max_lr - p.warmup_min_lr
        # DeepSpeed clamps to 2: log(1) = 0 would make the log warmup divide by zero
        if p.warmup_num_steps == 0:  # DeepSpeed raises ValueError in its constructor
            raise ConfigError("scheduler.params.warmup_num_steps must be >= 1; got 0")
        self.warmup_num_steps = max(2, p.warmup_num_steps)
        self.warmup_type = p.warmup_type
        self._inverse_log_warmup = 1.0 / math.log(self.warmup_num_steps)

    def lr_at(self, step: int) -> float:
        if _check_step(step) < 0:
            return self.min_lr  # DeepSpeed's get_lr() before the first step()
        return self.min_lr + self.delta_lr * self._gamma(step)

    def _gamma(self, step: int) -> float:
        """Fraction of the way from min to max lr (DeepSpeed's _get_gamma)."""
        if step < self.warmup_num_steps:
            return self._warmup_gamma(step)
        return 1.0

    def _warmup_gamma(self, step: int) -> float:
        if self.warmup_type == "log":  # same operation order as DeepSpeed: bit-identical
            return self._inverse_log_warmup * math.log(step + 1)
        return step / self.warmup_num_steps


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay from warmup_max_lr to 0 at total_num_steps."""

    def __init__(self, p: WarmupDecayLRParams, *, last_batch_iteration: int = 0) -> None:
        super().__init__(p, last_batch_iteration=last_batch_iteration)
        self.total_num_steps = p.total_num_steps
        if self.total_num_steps < self.warmup_num_steps:
            # DeepSpeed warms up to the clamped warmup length, then its decay term is already
            # clipped to 0; it warns and runs, so do we
            log.warning("total_num_steps %d is less than warmup_num_steps %d",
                        p.total_num_steps, p.warmup_num_steps)

    def _gamma(self, step: int) -> float:
        if step < self.warmup_num_steps:
            return self._warmup_gamma(step)
        # max(1, ...): total == warmup would divide by zero
        return max(0.0, float(self.total_num_steps - step)
                   / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class OneCycle(Schedule):
    """One triangular lr cycle (beta1 moves the other way), then optional decay.

    As in DeepSpeed, after the cycle lr decays as min_lr / (1 + rate * interval) while beta1
    *grows* as max_mom * (1 + rate * interval). DeepSpeed also sets beta2 to 0.99 when it
    cycles momentum; momentum_at returns beta1 only and leaves that to the engine.
    """

    def __init__(self, p: OneCycleParams, *, last_batch_iteration: int = 0) -> None:
        super().__init__(last_batch_iteration=last_batch_iteration)
        first = float(p.cycle_first_step_size)
        second = first if p.cycle_second_step_size is None else float(p.cycle_second_step_size)
        self.first_step_size, self.second_step_size = first, second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = p.cycle_first_stair_count
        self.second_stair_count = (p.cycle_first_stair_count if p.cycle_second_stair_count is None
                                   else p.cycle_second_stair_count)
        self.min_lr, self.max_lr = p.cycle_min_lr, p.cycle_max_lr
        self.decay_lr_rate = p.decay_lr_rate
        self.cycle_momentum = p.cycle_momentum
        self.min_mom, self.max_mom = p.cycle_min_mom, p.cycle_max_mom
        self.decay_mom_rate = p.decay_mom_rate
        self.decay_step_size = p.decay_step_size
        # decay_step_size 0 means "no decay" (and would divide by zero)
        self.skip_lr_decay = p.decay_step_size == 0 or p.decay_lr_rate == 0
        self.skip_mom_decay = p.decay_step_size == 0 or p.decay_mom_rate == 0
        self._warn_momentum_past_one()

    def _warn_momentum_past_one(self) -> None:
        """DeepSpeed's post-cycle momentum is max_mom x (1 + rate x interval): it grows, and
        past 1 Adam diverges. The formula stays DeepSpeed's (checkpoints and curves agree);
        the step where beta1 reaches 1 is said once, here, rather than found as NaNs."""
        if not self.cycle_momentum or self.skip_mom_decay or self.max_mom == 0:
            return
        at = self._first_step_momentum_reaches_one()
        if at <= MAX_STEPS:
            log.warning("scheduler OneCycle: decay_mom_rate %g makes beta1 reach 1 at step %d "
                        "(DeepSpeed's post-cycle momentum grows as cycle_max_mom x (1 + rate x "
                        "interval)), where Adam diverges; set decay_mom_rate 0 or stop before",
                        self.decay_mom_rate, at)

    def _first_step_momentum_reaches_one(self) -> int:
        """The first step with momentum_at(step) >= 1 (max_mom, rate, decay_step_size > 0):
        solved for the interval, then moved to the exact step momentum_at gives."""
        interval = (1.0 / self.max_mom - 1.0) / self.decay_mom_rate
        estimate = interval * self.decay_step_size + self.total_size - 1
        if not estimate <= MAX_STEPS:  # (inf for a tiny max_mom)
            return MAX_STEPS + 1
        at = max(int(self.total_size), math.ceil(estimate))
        while at > self.total_size and self.momentum_at(at - 1) >= 1.0:  # float rounding
            at -= 1
        while self.momentum_at(at) < 1.0:
            at += 1
        return at

    def _scale(self, step: int) -> float:
        """Position in the triangle, 0 at the ends and 1 at the peak (DeepSpeed's +1 offset)."""
        batch_iteration = step + 1
        cycle = math.floor(1 + batch_iteration / self.total_size)
        x = 1.0 + batch_iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            return self._stair_scale(batch_iteration, stairs)
        return scale

    def _stair_scale(self, batch_iteration: int, stairs: int) -> float:
        """`scale` held flat over `stairs` equal stairs per half (0: continuous).

        Like DeepSpeed, quantised from the integer offset into the cycle, not by flooring the
        float scale: that can sit 1e-16 under a stair edge and drop a whole stair (even the
        peak) for an asymmetric cycle.
        """
        cycle_iteration = batch_iteration % self.total_size
        if cycle_iteration <= self.first_step_size:
            position = cycle_iteration * stairs / self.first_step_size
        else:
            position = (self.total_size - cycle_iteration) * stairs / self.second_step_size
        return math.floor(position) / stairs

    def _decay_interval(self, step: int) -> float:
        return (step - self.total_size + 1) / self.decay_step_size

    def lr_at(self, step: int) -> float:
        if _check_step(step) < self.total_size:
            return self.min_lr + (self.max_lr - self.min_lr) * self._scale(step)
        if self.skip_lr_decay:
            return self.min_lr
        return self.min_lr / (1 + self.decay_lr_rate * self._decay_interval(step))

    def momentum_at(self, step: int) -> float | None:
        if not self.cycle_momentum:
            return None
        if _check_step(step) < 0:
            # DeepSpeed's constructor puts cycle_min_mom into the optimizer, not the cycle's
            # value there (max_mom); the first step() then moves it onto the cycle
            return self.min_mom
        if step < self.total_size:
            return self.max_mom - (self.max_mom - self.min_mom) * self._scale(step)
        if self.skip_mom_decay:
            return self.max_mom
        return self.max_mom * (1 + self.decay_mom_rate * self._decay_interval(step))


class LRRangeTest(Schedule):
    """lr grows linearly (or in stairs) from lr_range_test_min_lr, to find a usable maximum."""

    def __init__(self, p: LRRangeTestParams, *, last_batch_iteration: int = 0) -> None:
        super().__init__(last_batch_iteration=last_batch_iteration)
        self.min_lr = p.lr_range_test_min_lr
        self.step_size = p.lr_range_test_step_size
        self.step_rate = p.lr_range_test_step_rate
        self.staircase = p.lr_range_test_staircase

    def lr_at(self, step: int) -> float:
        interval = float(_check_step(step) + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return self.min_lr * (1 + self.step_rate * interval)


class WarmupCosineLR(Schedule):
    """The optimizer's own lr times a ratio: warmup_min_ratio rising to 1 over
    warmup_num_steps, then a cosine down to cos_min_ratio at total_num_steps, held after.
    DeepSpeed scales each param group's lr; zerofx has one lr, ``base_lr`` (the config
    optimizer's, or the first group's of a torch optimizer)."""

    def __init__(self, p: WarmupCosineLRParams, *, base_lr: float,
                 last_batch_iteration: int = 0) -> None:
        super().__init__(last_batch_iteration=last_batch_iteration)
        self.base_lr = base_lr
        self.total_num_steps = p.total_num_steps
        self.warmup_min_ratio, self.cos_min_ratio = p.warmup_min_ratio, p.cos_min_ratio
        self.warmup_type = p.warmup_type
        self.warmup_num_steps = max(2, p.warmup_num_steps)  # DeepSpeed's clamp, as WarmupLR
        self._inverse_log_warmup = 1.0 / math.log(self.warmup_num_steps)
        if self.total_num_steps < self.warmup_num_steps:
            log.warning("total_num_steps %d is less than warmup_num_steps %d",
                        p.total_num_steps, p.warmup_num_steps)

    def lr_at(self, step: int) -> float:
        if _check_step(step) < 0:
            return 0.0  # DeepSpeed's get_lr() before the first step()
        return self.base_lr * self._ratio(step)

    def _ratio(self, step: int) -> float:
        """DeepSpeed's get_lr_ratio, in its operation order."""
        if step < self.warmup_num_steps:
            if self.warmup_type == "log":
                ratio = self._inverse_log_warmup * math.log(step + 1)
            else:
                ratio = step / self.warmup_num_steps
            return self.warmup_min_ratio + ratio * (1. - self.warmup_min_ratio)
        real_step = step - self.warmup_num_steps + 1
        real_total = max(1, self.total_num_steps - self.warmup_num_steps)
        # clamped: past the end the ratio stays at the floor instead of rising again
        progress = min(1.0, real_step / real_total)
        ratio = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1. - self.cos_min_ratio) * ratio)


# DeepSpeed's names for the schedule types (scripts and Accelerate test membership in it)
LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR = "LRRangeTest", "OneCycle", "WarmupLR"
WARMUP_DECAY_LR, WARMUP_COSINE_LR = "WarmupDecayLR", "WarmupCosineLR"
VALID_LR_SCHEDULES = [LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR]

_BY_TYPE: dict[str, type[Schedule]] = {
    "WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR,
    "OneCycle": OneCycle, "LRRangeTest": LRRangeTest,
}


def make_schedule(cfg: SchedulerConfig, *, last_batch_iteration: int = 0,
                  base_lr: float | None = None) -> Schedule:
    """The schedule that `cfg` describes, at `last_batch_iteration` (0: before training).
    ``base_lr``: the optimizer's lr, which WarmupCosineLR scales (the others set the lr)."""
    if cfg.type == "WarmupCosineLR":
        if base_lr is None:
            raise ConfigError("scheduler WarmupCosineLR scales the optimizer's lr: give "
                              "make_schedule base_lr")
        return WarmupCosineLR(cfg.params, base_lr=base_lr,
                              last_batch_iteration=last_batch_iteration)
    return _BY_TYPE[cfg.type](cfg.params, last_batch_iteration=last_batch_iteration)
