"""Fused Adam, AdamW and LAMB over a rank's flat fp32 shard: kernel loading and thin front-ends.

The ops (schemas in ``optim_ops``) are ``torch.ops.zerofx.adam_step_``, ``lamb_moments_`` and
``lamb_apply_``. One pass over the shard reads the gradient in its stored dtype, multiplies it
by ``grad_scale`` (1/loss_scale x clip coefficient), updates the moments and the fp32 master
weight and writes the bf16/fp16 copy for the all-gather; a nonzero ``skip`` (overflow) leaves
everything untouched. ZeRO LAMB across ranks::

    sums = lamb_moments_(...)            # [2, T] partial sum w^2, sum u^2 of this shard's pieces
    dist.all_reduce(sums)                # whole-tensor sums (what lamb_step_(group=...) does)
    ratio = lamb_trust_ratio(sums, hyper=hyper)
    lamb_apply_(..., trust_ratio=ratio)

``load_kernels()`` (runtime/kernels.py) JIT-builds zerofx/csrc on first use; if that fails
the same ops run a plain-torch fallback. The unsharded LAMB reference the tests check the
kernels against is in tests/reference.py.
"""
import dataclasses

import torch

from zerofx.runtime import optim_ops  # noqa: F401  (importing it defines the zerofx:: ops)
from zerofx.runtime.kernels import load_kernels

zerofx_ops = torch.ops.zerofx

__all__ = [
    "grad_sumsq", "AdamHyper", "LambHyper", "load_kernels", "adam_step_", "lamb_moments_", "lamb_apply_",
    "lamb_trust_ratio", "lamb_step_", "combined_grad_scale", "adam_kwargs",
    "lamb_kwargs",
]


def _check_betas(betas, eps, weight_decay):
    if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    if eps < 0 or weight_decay < 0:
        raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")


@dataclasses.dataclass(frozen=True)
class AdamHyper:
    """Fixed Adam/AdamW hyperparameters, named as in DeepSpeed's FusedAdam (lr is per step)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moment."""
    eps: float = 1e-8
    """Added to the denominator, outside the square root."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (Adam) weight decay, per adam_w_mode."""
    bias_correction: bool = True
    """Divide the moments by 1 - beta^step."""
    adam_w_mode: bool = True
    """True: AdamW (decay shrinks the weight). False: Adam (decay joins the gradient)."""

    def __post_init__(self):
        _check_betas(self.betas, self.eps, self.weight_decay)


@dataclasses.dataclass(frozen=True)
class LambHyper:
    """Fixed LAMB hyperparameters, named as in DeepSpeed's FusedLamb (lr is per step)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moment."""
    eps: float = 1e-8
    """Added to the second moment, inside or outside its square root per eps_inside_sqrt."""
    eps_inside_sqrt: bool = False
    """True: denom = sqrt(v + eps). False: denom = sqrt(v) + eps."""
    weight_decay: float = 0.0
    """Added to the update direction as weight_decay * w (so it counts in the trust ratio)."""
    bias_correction: bool = True
    """Scale the step by sqrt(1 - beta2^step) / (1 - beta1^step)."""
    max_grad_norm: float = 0.0
    """Clip the gradient to this global norm (see combined_grad_scale); 0 disables."""
    max_coeff: float = 10.0
    """Upper clamp of the per-tensor trust ratio |w| / |u|."""
    min_coeff: float = 0.01
    """Lower clamp of the per-tensor trust ratio."""

    def __post_init__(self):
        _check_betas(self.betas, self.eps, self.weight_decay)
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")


def beta1_tensor(beta1, device=None) -> torch.Tensor:
    """beta1 as the ops take it: a 0-d float64 tensor (a schedule may move it per step)."""
    if isinstance(beta1, torch.Tensor):
        return beta1
    return torch.tensor(float(beta1), dtype=torch.float64, device=device)


def adam_kwargs(hyper: AdamHyper, *, beta1=None) -> dict:
    """The keyword arguments of zerofx::adam_step_ (beta1: the hyper's unless given)."""
    return dict(beta1=beta1_tensor(hyper.betas[0] if beta1 is None else beta1),
                beta2=hyper.betas[1], eps=hyper.eps,
                weight_decay=hyper.weight_decay, bias_correction=hyper.bias_correction,
                adam_w_mode=hyper.adam_w_mode)


def lamb_kwargs(hyper: LambHyper, *, apply: bool, beta1=None) -> dict:
    """The keyword arguments of zerofx::lamb_moments_ (apply=False) or lamb_apply_."""
    kw = dict(beta1=beta1_tensor(hyper.betas[0] if beta1 is None else beta1),
              beta2=hyper.betas[1], eps=hyper.eps,
              weight_decay=hyper.weight_decay, eps_inside_sqrt=hyper.eps_inside_sqrt)
    if apply:
        kw["bias_correction"] = hyper.bias_correction
    return kw


# --------------------------------------------------------------------------- front-ends
def _scalar(x, device) -> torch.Tensor:
    """A per-step value as the one-element fp32 tensor the ops take (numbers are converted)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def grad_sumsq(grad: torch.Tensor) -> torch.Tensor:
    """Float32 sum of squares of a flat gradient (one vectorised pass; inf/nan propagate)."""
    load_kernels()
    return zerofx_ops.grad_sumsq(grad)


@torch.no_grad()
def adam_step_(param, grad, exp_avg, exp_avg_sq, *, lr, step, hyper: AdamHyper = AdamHyper(),
               grad_scale=1.0, skip=0.0, param_out=None, beta1=None) -> None:
    """One fused Adam/AdamW step of a flat fp32 shard, in place (see zerofx::adam_step_).

    step is the count after this step's increment; leave it unchanged on a skipped step.
    """
    load_kernels()
    dev = param.device
    zerofx_ops.adam_step_(param, grad, exp_avg, exp_avg_sq, param_out, _scalar(lr, dev),
                          _scalar(step, dev), _scalar(grad_scale, dev), _scalar(skip, dev),
                          **adam_kwargs(hyper, beta1=beta1))


@torch.no_grad()
def lamb_moments_(param, grad, exp_avg, exp_avg_sq, tensor_bounds, *, hyper: LambHyper,
                  grad_scale=1.0, skip=0.0, shard_offset: int = 0, beta1=None) -> torch.Tensor:
    """LAMB pass 1: update the moments; return [2, T] partial sums (sum w^2, sum u^2)."""
    load_kernels()
    dev = param.device
    return zerofx_ops.lamb_moments_(param, grad, exp_avg, exp_avg_sq, tensor_bounds,
                                    _scalar(grad_scale, dev), _scalar(skip, dev),
                                    shard_offset=shard_offset,
                                    **lamb_kwargs(hyper, apply=False, beta1=beta1))


def lamb_trust_ratio(sums: torch.Tensor, *, hyper: LambHyper) -> torch.Tensor:
    """Per-tensor trust ratio |w| / |u| from whole-tensor square sums, as DeepSpeed clamps it.

    1.0 where either norm is zero. Plain torch ops, so it traces into the step graph.
    """
    w_norm, u_norm = sums[0].sqrt(), sums[1].sqrt()
    ratio = (w_norm / u_norm).clamp(max=hyper.max_coeff).clamp(min=hyper.min_coeff)
    return torch.where((w_norm != 0) & (u_norm != 0), ratio, torch.ones_like(ratio))


@torch.no_grad()
def lamb_apply_(param, exp_avg, exp_avg_sq, tensor_bounds, trust_ratio, *, lr, step,
                hyper: LambHyper, skip=0.0, shard_offset: int = 0, param_out=None,
                beta1=None) -> None:
    """LAMB pass 2: param -= step_size * trust_ratio[tensor] * u; writes param_out too."""
    load_kernels()
    dev = param.device
    zerofx_ops.lamb_apply_(param, exp_avg, exp_avg_sq, param_out, tensor_bounds, trust_ratio,
                           _scalar(lr, dev), _scalar(step, dev), _scalar(skip, dev),
                           shard_offset=shard_offset,
                           **lamb_kwargs(hyper, apply=True, beta1=beta1))


@torch.no_grad()
def lamb_step_(param, grad, exp_avg, exp_avg_sq, tensor_bounds, *, lr, step, hyper: LambHyper,
               grad_scale=1.0, skip=0.0, shard_offset: int = 0, param_out=None,
               group=None) -> torch.Tensor:
    """A whole LAMB step of one shard (eager); returns the per-tensor trust ratios.

    group: the process group whose shards together hold the tensors (their partial norms are
    all-reduced over it); None when this shard is the only one. A traced step graph calls the
    two ops itself, with a functional all-reduce between them.
    """
    sums = lamb_moments_(param, grad, exp_avg, exp_avg_sq, tensor_bounds, hyper=hyper,
                         grad_scale=grad_scale, skip=skip, shard_offset=shard_offset)
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    ratio = lamb_trust_ratio(sums, hyper=hyper)
    lamb_apply_(param, exp_avg, exp_avg_sq, tensor_bounds, ratio, lr=lr, step=step, hyper=hyper,
                skip=skip, shard_offset=shard_offset, param_out=param_out)
    return ratio


def combined_grad_scale(loss_scale, *, grad_norm=None, max_grad_norm: float = 0.0):
    """grad_scale for the ops: 1 / (loss_scale x clip), clip as in DeepSpeed's FusedLamb.

    grad_norm is the global norm of the still-scaled gradients; with max_grad_norm > 0 the
    gradient is clipped when (grad_norm / loss_scale + 1e-6) / max_grad_norm > 1. Tensor ops
    only, so nothing is read on the host.
    """
    loss_scale = torch.as_tensor(loss_scale, dtype=torch.float32)
    combined = loss_scale
    if max_grad_norm > 0 and grad_norm is not None:
        clip = (grad_norm / loss_scale + 1e-6) / max_grad_norm
        combined = torch.where(clip > 1, clip * loss_scale, loss_scale)
    return 1.0 / combined
