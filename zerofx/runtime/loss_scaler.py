"""Loss scaling state on the device: DeepSpeed's DynamicLossScaler, without host reads.

The rule is DeepSpeed's ``DynamicLossScaler.update_scale`` (deepspeed/runtime/fp16/
loss_scaler.py), transcribed from its code:

    overflow:     if delayed_shift == 1 or hysteresis == 1:
                      scale at min_scale already: DeepSpeed raises ("cannot decrease")
                      else scale = max(scale / 2, min_scale)
                  else: hysteresis -= 1
                  last_overflow_iter = iter
    no overflow:  if consecutive_hysteresis: hysteresis = delayed_shift
                  stable = (iter - last_overflow_iter) - 1
                  if stable > 0 and stable % window == 0:
                      if not consecutive_hysteresis: hysteresis = delayed_shift
                      scale *= 2
    iter += 1

Every quantity is a 0-d tensor and ``update`` is branch-free (torch.where), so the step never
reads the scale on the host and changing it never recompiles a graph. Where DeepSpeed raises
at the minimum scale, the device counts the event (``floor_hits``) and the runtime raises at
its next host check, one step later, with the skipped step's state untouched. Growth stops
at 2**127 (MAX_SCALE), the largest power of two in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# MAX_SCALE: the largest power of two a float32 holds. DeepSpeed's Python-float scale may
# double past it, but a float32 scale of inf would stay inf when halved and skip every step.
from zerofx.config import MAX_SCALE, FP16Config

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
    consecutive_hysteresis: bool = False
    # int64, 0-d: overflows that arrived with the scale already at min_scale (DeepSpeed
    # raises on the first); transient, not checkpointed
    floor_hits: torch.Tensor | None = None

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
                   fp16.hysteresis, fp16.min_loss_scale, fp16.consecutive_hysteresis,
                   t(0, torch.int64))

    @torch.no_grad()
    def update(self, overflow: torch.Tensor) -> None:
        """Advance one step given a 0-d bool ``overflow`` (already agreed across ranks)."""
        if not self.dynamic:
            return
        clean = ~overflow
        halve = overflow & ((self.hysteresis == 1) | (self.delayed_shift == 1))
        stable = (self.iter - self.last_overflow_iter) - 1
        grow = clean & (stable > 0) & (stable % self.window == 0)
        refill = clean & (torch.ones_like(clean) if self.consecutive_hysteresis else grow)
        if self.floor_hits is not None:
            self.floor_hits.add_((halve & (self.scale <= self.min_scale)).long())
        new_scale = torch.where(halve, torch.clamp(self.scale / 2, min=self.min_scale),
                                torch.where(grow, torch.clamp(self.scale * 2, max=MAX_SCALE),
                                            self.scale))
        new_hyst = torch.where(overflow & ~halve, self.hysteresis - 1,
                               torch.where(refill, torch.full_like(self.hysteresis,
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
