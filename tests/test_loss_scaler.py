"""Device-side dynamic loss scaling against a plain-Python transcription of DeepSpeed's."""
import random

import pytest
import torch

from zerofx.config import FP16Config
from zerofx.runtime.loss_scaler import MAX_SCALE, LossScaler


class FloorError(Exception):
    pass


class DeepSpeedScaler:
    """DeepSpeed's DynamicLossScaler.update_scale transcribed from its code (not from its
    docstring): deepspeed/runtime/fp16/loss_scaler.py, raise_error_at_min_scale=True."""

    def __init__(self, init_scale, window, min_scale, delayed_shift, consecutive):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_factor, self.scale_window, self.min_scale = 2.0, window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive

    def update_scale(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    raise FloorError  # "Current loss scale already at minimum"
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
            if (stable_interval > 0) and (stable_interval % self.scale_window == 0):
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


def _pattern(seed, n=400):
    """Random runs of overflows and clean stretches (long enough to grow, short to halve)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        out += [1] * rng.choice([1, 1, 2, 3, 6]) + [0] * rng.choice([0, 1, 2, 3, 5, 9, 17])
    return out[:n]


@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_trajectory_matches_deepspeed_on_random_patterns(window, hysteresis, consecutive):
    grew = False
    for seed in range(6):
        min_scale = (1.0, 4.0, 0.5)[seed % 3]
        cfg = FP16Config(enabled=True, initial_scale_power=6, loss_scale_window=window,
                         hysteresis=hysteresis, min_loss_scale=min_scale,
                         consecutive_hysteresis=consecutive)
        ours = LossScaler.from_config(cfg)
        ref = DeepSpeedScaler(2.0 ** 6, window, min_scale, hysteresis, consecutive)
        for i, overflow in enumerate(_pattern(seed)):
            try:
                ref.update_scale(bool(overflow))
            except FloorError:  # DeepSpeed stops; zerofx counts it for the runtime to raise
                ours.update(torch.tensor(bool(overflow)))
                assert int(ours.floor_hits) == 1, f"seed {seed} step {i}"
                break
            before = float(ours.scale)
            ours.update(torch.tensor(bool(overflow)))
            if ref.cur_scale > MAX_SCALE:  # past float32: zerofx holds at 2**127
                assert float(ours.scale) == MAX_SCALE
                break
            grew |= float(ours.scale) > before
            assert int(ours.floor_hits) == 0, f"seed {seed} step {i}"
            assert float(ours.scale) == ref.cur_scale, f"seed {seed} step {i}"
            assert int(ours.hysteresis) == ref.cur_hysteresis, f"seed {seed} step {i}"
    assert grew  # the patterns exercise growth, not only halving


def test_growth_waits_for_a_full_window_after_an_overflow():
    """window 3: overflow at iter 0, then the scale doubles after 3 clean steps (iter 4)."""
    cfg = FP16Config(enabled=True, initial_scale_power=4, loss_scale_window=3, hysteresis=1)
    ours = LossScaler.from_config(cfg)
    scales = []
    for overflow in [1, 0, 0, 0, 0, 0, 0, 0]:
        ours.update(torch.tensor(bool(overflow)))
        scales.append(float(ours.scale))
    assert scales == [8, 8, 8, 8, 16, 16, 16, 32]


def test_static_and_disabled_scales_never_move():
    static = LossScaler.from_config(FP16Config(enabled=True, loss_scale=128.0))
    off = LossScaler.from_config(FP16Config(enabled=False))
    for overflow in (True, False, True):
        static.update(torch.tensor(overflow))
        off.update(torch.tensor(overflow))
    assert (float(static.scale), float(off.scale)) == (128.0, 1.0)


def test_state_dict_round_trip():
    a = LossScaler.from_config(FP16Config(enabled=True, initial_scale_power=8))
    for overflow in (True, True, False):
        a.update(torch.tensor(overflow))
    b = LossScaler.from_config(FP16Config(enabled=True))
    b.load_state_dict(a.state_dict())
    for overflow in (False, True, True, False):
        a.update(torch.tensor(overflow))
        b.update(torch.tensor(overflow))
        assert float(a.scale) == float(b.scale) and int(a.hysteresis) == int(b.hysteresis)
    with pytest.raises(KeyError, match="lacks"):
        b.load_state_dict({"scale": torch.tensor(1.0)})
