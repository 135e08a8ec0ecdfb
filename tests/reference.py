"""Independent references for the tests: the single-process optimizer step with DeepSpeed's
rule for missing gradients, and DeepSpeed's FusedLamb step as plain math."""
from __future__ import annotations

import math

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


@torch.no_grad()
def lamb_reference(params, grads, exp_avgs, exp_avg_sqs, *, lr: float, step: int,
                   hyper: LambHyper, grad_scale: float = 1.0) -> list[float]:
    """DeepSpeed's FusedLamb step over whole (unsharded) fp32 tensors, in place.

    A plain transcription of fused_lamb_cuda_kernel.cu with Python numbers; returns the trust
    ratio of each tensor.
    """
    beta1, beta2 = hyper.betas
    step_size = lr
    if hyper.bias_correction:
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    ratios = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g = g.float() * grad_scale
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        denom = (v + hyper.eps).sqrt() if hyper.eps_inside_sqrt else v.sqrt() + hyper.eps
        update = m / denom + hyper.weight_decay * p
        w_norm, u_norm = p.double().norm().item(), update.double().norm().item()
        coeff = 1.0
        if w_norm != 0 and u_norm != 0:
            coeff = max(min(w_norm / u_norm, hyper.max_coeff), hyper.min_coeff)
        p.sub_(step_size * coeff * update)
        ratios.append(coeff)
    return ratios
