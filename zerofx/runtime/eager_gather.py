"""ZeRO-3 outside the compiled graphs: a module called eagerly gathers its own weights.

Between compiled calls a partitioned parameter is an empty tensor. DeepSpeed's stage 3 lets
eager code run the model anyway (``engine.module(x)``, Hugging Face ``generate``, an eval
loop without compile) by gathering each module's parameters in a forward pre-hook and
releasing them in a forward hook; so does zerofx, with the same rule that every rank of the
data-parallel group makes the same calls (each gather is a collective).

The hooks do nothing while Dynamo traces (the compiled graphs gather for themselves, the
zero3 pass) and nothing when the weights are already whole (``gathered_parameters``, or
the full-shape stand-ins of a compiled call). Weights zerofx splits for tensor parallelism
cannot run eagerly at any stage (each rank holds a piece): such a call is refused by name
instead of failing deep inside the model on a shape.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from zerofx.config import ConfigError


# Modules Dynamo never puts in a graph ("Dynamo does not support RNN, GRU, or LSTM"): their
# forward and backward always run eagerly, where a partitioned weight would have to stay
# gathered from the forward until its backward (autograd saves the parameter itself).
EAGER_MODULES = (nn.RNNBase,)


def eager_only_params(model: nn.Module, named) -> frozenset[str]:
    """Names (as in ``named``) of the parameters of modules Dynamo always runs eagerly;
    stage 3 keeps them whole, like parameters under the persistence threshold."""
    ids = {id(p) for m in model.modules() if isinstance(m, EAGER_MODULES)
           for p in m.parameters(recurse=False)}
    return frozenset(n for n, p in named if id(p) in ids)


def install(rt, model: nn.Module) -> list:
    """Hooks on every module that owns partitioned or tensor-parallel parameters; returns
    their handles."""
    empty = rt.carriers.between_calls()  # {id(param): its value between calls}
    handles = []
    runtime = weakref.ref(rt)
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in empty]
        if not own:
            continue
        gathered: list = []  # what this module's pre-hook gathered, released after it

        def pre(mod, args, own=own, gathered=gathered):
            rt = runtime()
            if rt is None or torch.compiler.is_compiling():
                return
            slots = [rt.plan.slot(rt.carriers.name_of(p)) for p in own]
            split = [s.name for p, s in zip(own, slots)
                     if s.tp is not None and tuple(p.shape) != tuple(s.tp.full_shape)]
            if split:
                raise ConfigError(
                    f"{type(mod).__name__} was called outside the compiled model: "
                    f"{split[0]} is split across the tensor-parallel ranks (each holds a "
                    f"piece), which cannot run eagerly. Call the engine (engine(...), with "
                    f"engine.eval() and torch.no_grad() to evaluate)")
            lacking = [p for p in own if p.numel() == 0]
            if not lacking:
                return
            names = [rt.carriers.name_of(p) for p in lacking]
            whole = rt.gatherer.whole_params(names)
            for p, n in zip(lacking, names):
                p.data = whole[n]
                gathered.append(p)

        def post(mod, args, out, gathered=gathered):
            while gathered:
                p = gathered.pop()
                p.data = empty[id(p)]

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles
