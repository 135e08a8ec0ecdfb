"""Autocast's rule for modules and ops whose kernels insist on one dtype.

Under bf16/fp16 the runtime keeps parameters in the compute dtype, and the model is fed fp32
as under torch.autocast. Inside the compiled graphs the mixed_precision pass casts a matmul's
inputs, but two kinds of module check dtypes before any pass sees them: a convolution's
composite op checks input against weight while Dynamo traces ("Input type (float) and bias
type (c10::BFloat16) should be the same"), and nn.LSTM/GRU/RNN run eagerly (Dynamo leaves
them out of the graph) where nothing casts. autocast casts both kinds' floating inputs to
the compute dtype; so does a forward pre-hook on each, compiled (Dynamo traces the hook) or
eager alike.

Batched matmuls and attention check too (their fake kernels, while Dynamo traces), and two
streams of different dtypes meet there: Whisper's decoder runs from a compute-dtype
embedding, its encoder from fp32 features plus an fp32 (frozen) position table, and its
cross-attention takes a bf16 query with fp32 keys. Autocast runs these ops in the compute
dtype, and so does the mixed_precision pass afterwards; ``LowPrecisionOps``, a torch function
mode around the model's call, casts their floating inputs to the compute dtype when they
disagree (only then: agreeing inputs pass untouched, whatever their dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

CAST_MODULES = (nn.modules.conv._ConvNd, nn.RNNBase)


def install(model: nn.Module, dtype: torch.dtype) -> list:
    """Pre-hooks casting floating inputs to ``dtype`` on every convolution and RNN module of
    ``model`` whose weights are in ``dtype``; returns their handles."""
    def cast(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype:
            return a.to(dtype)
        return a

    def pre(mod, args, kwargs):
        return tree_map(cast, args), tree_map(cast, kwargs)

    return [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules()
            if isinstance(m, CAST_MODULES)
            and any(p.dtype == dtype for p in m.parameters(recurse=False))]


# Functions whose floating tensor arguments must share one dtype (F.linear and mm need not:
# their fake kernels promote, and the pass casts them).
_ONE_DTYPE = {F.scaled_dot_product_attention, torch.matmul, torch.Tensor.matmul,
              torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.baddbmm,
              torch.Tensor.baddbmm}


# Run eagerly (a @torch._dynamo.disable region, a module Dynamo skips, frames past the
# recompile limit), no pass casts at all: these also take one dtype, the compute dtype
# (autocast's lower-precision list), or fp32 for the normalisations (its fp32 list). Traced,
# they are left to the mixed_precision pass, whose policy is the same.
_EAGER_LOW = {F.linear, F.bilinear, torch.mm, torch.Tensor.mm, torch.addmm, torch.Tensor.addmm,
              torch.mv, torch.Tensor.mv, torch.addmv, torch.addbmm, torch.einsum, F.conv1d,
              F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_EAGER_FP32 = {F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm}


class LowPrecisionOps(TorchFunctionMode):
    """Inside: the ops of ``_ONE_DTYPE`` given floating tensors of different dtypes get them
    all in ``dtype`` (autocast's choice for these ops); run eagerly, those of ``_EAGER_LOW``
    too, and ``_EAGER_FP32``'s in fp32."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ONE_DTYPE:
            dtypes = {a.dtype for a in args
                      if isinstance(a, torch.Tensor) and a.is_floating_point()}
            if len(dtypes) > 1:
                args = tuple(a.to(self.dtype) if isinstance(a, torch.Tensor)
                             and a.is_floating_point() else a for a in args)
        elif (func in _EAGER_LOW or func in _EAGER_FP32) and not torch.compiler.is_compiling():
            # (only these ask whether Dynamo traces: asked for every op, e.g. a tensor's
            # .dtype, the traced answer came back an int inside nn.LSTM's forward)
            to = self.dtype if func in _EAGER_LOW else torch.float32
            floats = [a for a in (*args, *kwargs.values()) if _floating(a)]
            if len({a.dtype for a in floats}) > 1:
                args = tuple(a.to(to) if _floating(a) else a for a in args)
                kwargs = {k: v.to(to) if _floating(v) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _floating(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()
