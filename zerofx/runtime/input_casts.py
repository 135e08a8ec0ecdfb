"""Autocast's rule for modules whose kernels insist on one dtype: convolutions and RNNs.

Under bf16/fp16 the runtime keeps parameters in the compute dtype, and the model is fed fp32
as under torch.autocast. Inside the compiled graphs the mixed_precision pass casts a matmul's
inputs, but two kinds of module check dtypes before any pass sees them: a convolution's
composite op checks input against weight while Dynamo traces ("Input type (float) and bias
type (c10::BFloat16) should be the same"), and nn.LSTM/GRU/RNN run eagerly (Dynamo leaves
them out of the graph) where nothing casts. autocast casts both kinds' floating inputs to
the compute dtype; so does a forward pre-hook on each, compiled (Dynamo traces the hook) or
eager alike.
"""
from __future__ import annotations

import torch
from torch import nn
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
