"""The single-process reference's optimizer step, with DeepSpeed's rule for missing grads."""
from __future__ import annotations

import torch


def deepspeed_step(model: torch.nn.Module, opt: torch.optim.Optimizer, clip: float) -> None:
    """A parameter without a gradient this step gets zeros (DeepSpeed's flat partition
    steps it anyway: moments decay, weight decay applies), then clip and step."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad()
