"""Schemas of the fused optimizer ops, their fake (shape) rules and the plain-torch fallback.

The ops are defined here, once, with ``torch.library``; zerofx/csrc only adds CPU and CUDA
kernels to them (TORCH_LIBRARY_IMPL). The plain-torch implementations below are registered as
the ops' CompositeExplicitAutograd kernels, so:

- when the C++ builds and loads, CPU (and CUDA) tensors dispatch to it;
- when it does not (or for a device it has no kernel for), the same op names run the same math
  in plain torch, and optimizer-step graphs look identical either way.

The fallback is also the transcription the kernels are tested against. Every per-step value
(``lr``, ``step``, ``grad_scale``, ``skip``) is a one-element tensor and is never read on the
host here, so the fallback does not synchronise a GPU either.

Shard layout for LAMB: ``tensor_bounds`` (int64, [T + 1]) holds the start offset of each of the
T tensors in the flat buffer, then the end of the last one. A rank's shard covers flat offsets
``[shard_offset, shard_offset + param.numel())``; shard elements outside every tensor (padding)
are left untouched.
"""
import torch

__all__ = ["SCHEMAS", "grad_sumsq_fallback", "adam_step_fallback", "lamb_moments_fallback", "lamb_apply_fallback"]

# name -> schema. Per-step values are tensors (no recompile when they change), beta1 among them
# (OneCycle cycles it; float64, so the kernels' double arithmetic sees the configured value
# exactly); fixed hyperparameters are plain floats and bools, named as in DeepSpeed.
SCHEMAS = {
    "adam_step_": (
        "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!)? param_out, Tensor lr, Tensor step, Tensor grad_scale, Tensor skip, *, "
        "Tensor beta1, float beta2, float eps, float weight_decay, bool bias_correction, "
        "bool adam_w_mode) -> ()"
    ),
    "lamb_moments_": (
        "(Tensor param, Tensor grad, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, "
        "Tensor tensor_bounds, Tensor grad_scale, Tensor skip, *, int shard_offset, "
        "Tensor beta1, float beta2, float eps, float weight_decay, bool eps_inside_sqrt) -> Tensor"
    ),
    "lamb_apply_": (
        "(Tensor(a!) param, Tensor exp_avg, Tensor exp_avg_sq, Tensor(b!)? param_out, "
        "Tensor tensor_bounds, Tensor trust_ratio, Tensor lr, Tensor step, Tensor skip, *, "
        "int shard_offset, Tensor beta1, float beta2, float eps, float weight_decay, "
        "bool bias_correction, bool eps_inside_sqrt) -> ()"
    ),
    # The step's global norm and overflow check: float32 sum of squares of a flat gradient.
    "grad_sumsq": "(Tensor grad) -> Tensor",
}


def _b1(beta1: torch.Tensor) -> torch.Tensor:
    return beta1.reshape(()).to(torch.float64)


def _skipped(skip: torch.Tensor) -> torch.Tensor:
    return skip.reshape(()).to(torch.bool)


def _keep_unless_skipped(skip: torch.Tensor, dst: torch.Tensor, new: torch.Tensor) -> None:
    # torch.where, not an `if`: reading the flag on the host would sync a GPU.
    dst.copy_(torch.where(_skipped(skip), dst, new))


def _bias_corrections(step, beta1, beta2, enabled):
    """(1 - beta1^step, sqrt(1 - beta2^step)) as 0-d float64 tensors, like the kernels' doubles."""
    step = step.reshape(()).to(torch.float64)
    if not enabled:
        one = torch.ones((), dtype=torch.float64, device=step.device)
        return one, one
    return 1 - beta1**step, torch.sqrt(1 - beta2**step)


def adam_step_fallback(param, grad, exp_avg, exp_avg_sq, param_out, lr, step, grad_scale, skip,
                       *, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode):
    """zerofx::adam_step_ in plain torch (same operation order as csrc/fused_adam.cpp)."""
    beta1 = _b1(beta1)
    lr64 = lr.reshape(()).to(torch.float64)
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2, bias_correction)
    g = grad.float() * grad_scale.reshape(()).float()
    if weight_decay != 0 and not adam_w_mode:
        g = g + param * weight_decay
    m = exp_avg + (1 - beta1).float() * (g - exp_avg)
    v = exp_avg_sq * beta2 + (1 - beta2) * g * g
    p = param * (1 - lr64 * weight_decay).float() if weight_decay != 0 and adam_w_mode else param
    denom = v.sqrt() * (1 / bc2_sqrt).float() + eps
    p = p + (-lr64 / bc1).float() * (m / denom)
    for dst, new in ((exp_avg, m), (exp_avg_sq, v), (param, p)):
        _keep_unless_skipped(skip, dst, new)
    if param_out is not None:
        _keep_unless_skipped(skip, param_out, p.to(param_out.dtype))


def _element_tensor(tensor_bounds, shard_offset, numel):
    """Per shard element: its tensor's index, and whether it lies inside any tensor."""
    flat = torch.arange(numel, device=tensor_bounds.device) + shard_offset
    idx = torch.searchsorted(tensor_bounds, flat, right=True) - 1
    inside = (idx >= 0) & (flat < tensor_bounds[-1])
    return idx.clamp(0, max(tensor_bounds.numel() - 2, 0)), inside


def _lamb_direction(param, m, v, *, eps, weight_decay, eps_inside_sqrt):
    denom = (v + eps).sqrt() if eps_inside_sqrt else v.sqrt() + eps
    return m / denom + weight_decay * param


def lamb_moments_fallback(param, grad, exp_avg, exp_avg_sq, tensor_bounds, grad_scale, skip, *,
                          shard_offset, beta1, beta2, eps, weight_decay, eps_inside_sqrt):
    """zerofx::lamb_moments_ in plain torch: new moments, returns [2, T] partial square sums."""
    beta1 = _b1(beta1)
    num_tensors = tensor_bounds.numel() - 1
    if num_tensors < 1:  # nothing in this shard belongs to a tensor
        return param.new_zeros(2, max(num_tensors, 0))
    idx, inside = _element_tensor(tensor_bounds, shard_offset, param.numel())
    g = grad.float() * grad_scale.reshape(()).float()
    m = torch.where(inside, beta1.float() * exp_avg + (1 - beta1).float() * g, exp_avg)
    v = torch.where(inside, beta2 * exp_avg_sq + (1 - beta2) * g * g, exp_avg_sq)
    u = _lamb_direction(param, m, v, eps=eps, weight_decay=weight_decay,
                        eps_inside_sqrt=eps_inside_sqrt)
    zero = torch.zeros((), dtype=param.dtype, device=param.device)
    squares = torch.stack([torch.where(inside, param * param, zero),
                           torch.where(inside, u * u, zero)])
    sums = torch.zeros(2, num_tensors, dtype=torch.float64, device=param.device)
    sums.index_add_(1, idx, squares.double())
    _keep_unless_skipped(skip, exp_avg, m)
    _keep_unless_skipped(skip, exp_avg_sq, v)
    return torch.where(_skipped(skip), 0.0, sums).float()


def lamb_apply_fallback(param, exp_avg, exp_avg_sq, param_out, tensor_bounds, trust_ratio, lr,
                        step, skip, *, shard_offset, beta1, beta2, eps, weight_decay,
                        bias_correction, eps_inside_sqrt):
    """zerofx::lamb_apply_ in plain torch: param -= step_size * trust_ratio[tensor] * update."""
    if tensor_bounds.numel() < 2:
        return
    beta1 = _b1(beta1)
    idx, inside = _element_tensor(tensor_bounds, shard_offset, param.numel())
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2, bias_correction)
    step_size = lr.reshape(()).to(torch.float64) * bc2_sqrt / bc1
    scale = (step_size * trust_ratio.to(torch.float64)).float()
    u = _lamb_direction(param, exp_avg, exp_avg_sq, eps=eps, weight_decay=weight_decay,
                        eps_inside_sqrt=eps_inside_sqrt)
    p = torch.where(inside, param + (-scale)[idx] * u, param)
    _keep_unless_skipped(skip, param, p)
    if param_out is not None:
        _keep_unless_skipped(skip, param_out, torch.where(inside, p.to(param_out.dtype), param_out))


def _adam_fake(param, grad, exp_avg, exp_avg_sq, param_out, lr, step, grad_scale, skip, **_):
    return None


def _lamb_moments_fake(param, grad, exp_avg, exp_avg_sq, tensor_bounds, grad_scale, skip, **_):
    return param.new_empty((2, tensor_bounds.shape[0] - 1), dtype=torch.float32)


def _lamb_apply_fake(*args, **kwargs):
    return None


def grad_sumsq_fallback(grad):
    """zerofx::grad_sumsq in plain torch: sum of squares in float32 (non-finite on overflow)."""
    return torch.linalg.vector_norm(grad, 2, dtype=torch.float32).square()


def _grad_sumsq_fake(grad):
    return grad.new_empty((), dtype=torch.float32)


def _define_ops() -> None:
    impls = {
        "grad_sumsq": (grad_sumsq_fallback, _grad_sumsq_fake),
        "adam_step_": (adam_step_fallback, _adam_fake),
        "lamb_moments_": (lamb_moments_fallback, _lamb_moments_fake),
        "lamb_apply_": (lamb_apply_fallback, _lamb_apply_fake),
    }
    for name, (fallback, fake) in impls.items():
        qualname = f"zerofx::{name}"
        torch.library.define(qualname, SCHEMAS[name])
        torch.library.impl(qualname, "CompositeExplicitAutograd", fallback)
        torch.library.register_fake(qualname, fake)


# Runs once, on first import: op definitions are process-wide registrations, like a class
# definition, and every user of the ops (graphs, kernels, tests) imports this module first.
_define_ops()
