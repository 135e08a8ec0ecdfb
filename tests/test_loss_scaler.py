"""Device-side dynamic loss scaling against a plain-Python transcription of DeepSpeed's."""
import pytest
import torch

from zerofx.config import FP16Config
from zerofx.runtime.loss_scaler import LossScaler


class DeepSpeedScaler:
    """DeepSpeed's DynamicLossScaler.update_scale (consecutive_hysteresis=False), as written."""

    def __init__(self, init_scale, window, min_scale, delayed_shift):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_factor, self.scale_window, self.min_scale = 2.0, window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift

    def update_scale(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


# overflow pattern: runs of overflows (hysteresis, halving, the floor) and clean windows
PATTERN = ([1, 0, 1, 1, 1] + [0] * 9 + [1] * 24 + [0] * 7 + [1, 0, 0, 1, 1, 0] + [0] * 10)


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("window", [1, 4])
def test_trajectory_matches_deepspeed(hysteresis, window):
    cfg = FP16Config(enabled=True, initial_scale_power=5, loss_scale_window=window,
                     hysteresis=hysteresis, min_loss_scale=2.0)
    ours = LossScaler.from_config(cfg)
    ref = DeepSpeedScaler(2.0 ** 5, window, 2.0, hysteresis)
    hit_floor = False
    for i, overflow in enumerate(PATTERN):
        ours.update(torch.tensor(bool(overflow)))
        ref.update_scale(bool(overflow))
        assert float(ours.scale) == ref.cur_scale, f"step {i}"
        assert int(ours.hysteresis) == ref.cur_hysteresis, f"step {i}"
        hit_floor |= ref.cur_scale == 2.0
    assert hit_floor  # the pattern exercises the min_loss_scale floor


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
