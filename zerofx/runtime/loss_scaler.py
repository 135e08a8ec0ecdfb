"""Loss scaling state on the device: DeepSpeed's DynamicLossScaler, without host reads.

The algorithm is DeepSpeed's current ``DynamicLossScaler.update_scale`` (the one its ZeRO
optimizers use, ``consecutive_hysteresis=False``):

    overflow:     if hysteresis == 1 (or delayed_shift == 1): scale = max(scale / 2, min_scale)
                  else: hysteresis -= 1
                  last_overflow_iter = iter
    no overflow:  if (iter - last_overflow_iter) % window == 0:
                      hysteresis = delayed_shift; scale *= 2
    iter += 1

Every quantity is a 0-d tensor and ``update`` is branch-free (torch.where), so the step never
reads the scale on the host and changing it never recompiles a graph. DeepSpeed raises when an
overflow arrives at the minimum scale; here the scale stays at the floor (raising would need a
host read every step) and the engine logs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zerofx.config import FP16Config

STATE_KEYS = ("scale", "hysteresis", "iter", "last_overflow_iter")


@dataclass
class LossScaler:
    """Current loss scale and the dynamic-scaling counters, as device tensors."""

    scale: torch.Tensor  # fp32, 0-d
    hysteresis: torch.Tensor  # int64, 0-d: overflows left before the scale halves
    iter: torch.Tensor  # int64, 0-d
    last_overflow_iter: torch.Tensor  # int64, 0-d
    dynamic: bool
    window: int
    delayed_shift: int
    min_scale: float

    @classmethod
    def from_config(cls, fp16: FP16Config, *, device="cpu") -> "LossScaler":
        """fp16 off: a static scale of 1. ``loss_scale > 0``: static. Otherwise dynamic."""
        dynamic = fp16.enabled and fp16.loss_scale == 0
        initial = 2.0 ** fp16.initial_scale_power if dynamic else (
            fp16.loss_scale if fp16.enabled else 1.0)

        def t(v, dtype):
            return torch.tensor(v, dtype=dtype, device=device)

        return cls(t(initial, torch.float32), t(fp16.hysteresis, torch.int64),
                   t(0, torch.int64), t(-1, torch.int64), dynamic, fp16.loss_scale_window,
                   fp16.hysteresis, fp16.min_loss_scale)

    @torch.no_grad()
    def update(self, overflow: torch.Tensor) -> None:
        """Advance one step given a 0-d bool ``overflow`` (already agreed across ranks)."""
        if not self.dynamic:
            return
        halve = overflow & ((self.hysteresis == 1) | (self.delayed_shift == 1))
        grow = ~overflow & ((self.iter - self.last_overflow_iter) % self.window == 0)
        new_scale = torch.where(halve, torch.clamp(self.scale / 2, min=self.min_scale),
                                torch.where(grow, self.scale * 2, self.scale))
        new_hyst = torch.where(overflow & ~halve, self.hysteresis - 1,
                               torch.where(grow, torch.full_like(self.hysteresis,
                                                                 self.delayed_shift),
                                           self.hysteresis))
        self.last_overflow_iter.copy_(torch.where(overflow, self.iter, self.last_overflow_iter))
        self.scale.copy_(new_scale)
        self.hysteresis.copy_(new_hyst)
        self.iter.add_(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in STATE_KEYS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"loss scaler state lacks {missing}")
        for k in STATE_KEYS:
            getattr(self, k).copy_(state[k])
