"""ZeRO-3 outside the compiled graphs: a module called eagerly gathers its own weights.

Between compiled calls a partitioned parameter is an empty tensor. DeepSpeed's stage 3 lets
eager code run the model anyway (``engine.module(x)``, Hugging Face ``generate``, an eval
loop without compile) by gathering each module's parameters in a forward pre-hook and
releasing them in a forward hook; so does zerofx, with the same rule that every rank of the
data-parallel group makes the same calls (each gather is a collective).

The hooks do nothing while Dynamo traces (the compiled graphs gather for themselves, the
zero3 pass) and nothing when the weights are already whole (``gathered_parameters``, or
the full-shape stand-ins of a compiled call). A call
that trains (grad enabled, the weight requires grad) keeps the weights whole past the call,
as autograd saved them for the backward, until the micro-step ends (DeepSpeed gathers them
again in the backward instead); their gradients reach the buckets through the runtime's
eager gradient hooks. Weights zerofx splits for tensor parallelism
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


def _stand_in(p) -> bool:
    """A compiled call's full-shape stand-in (carriers.py): one element, expanded."""
    return p.numel() > 1 and p.untyped_storage().nbytes() < p.numel() * p.element_size()


def release_held(rt) -> None:
    """The weights eager training calls kept whole for their backward go back to empty
    (at the end of each micro-step, before any step rewrites the shards)."""
    for p, empty in rt.eager_held.values():
        p.data = empty
    rt.eager_held.clear()


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
        gathered: list = []  # (param, its value before) the pre-hook gathered, for post

        def pre(mod, args, own=own, gathered=gathered):
            rt = runtime()
            if rt is None or torch.compiler.is_compiling():
                return
            slots = [rt.plan.slot(rt.carriers.name_of(p)) for p in own]
            split = [s.name for p, s in zip(own, slots) if s.tp is not None and (
                tuple(p.shape) != tuple(s.tp.full_shape) or _stand_in(p))]
            # inside a compiled call (a graph break: @torch._dynamo.disable, past the
            # recompile limit) the weights are the call's stand-ins, not values
            inside = [(p, s) for p, s in zip(own, slots) if s.tp is None and _stand_in(p)]
            trains = [s.name for p, s in inside if p.requires_grad and torch.is_grad_enabled()]
            if trains:
                raise ConfigError(
                    f"{type(mod).__name__} ran eagerly inside the compiled model while "
                    f"training (a graph break: @torch._dynamo.disable, an op Dynamo cannot "
                    f"trace, or past Dynamo's recompile limit): its ZeRO-3 parameter "
                    f"{trains[0]} is gathered only inside compiled graphs, and autograd "
                    f"would keep no value of it for the backward. Remove the break, or raise "
                    f"zero_optimization.stage3_param_persistence_threshold above its size "
                    f"({rt.plan.slot(trains[0]).numel}) so it stays whole")
            if inside:  # a forward without gradients: the values for the call, then back
                whole = rt.gatherer.whole_params([s.name for _, s in inside])
                for p, s in inside:
                    gathered.append((p, p.data))
                    p.data = whole[s.name]
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
                gathered.append((p, p.data))
                p.data = whole[n]

        def post(mod, args, out, gathered=gathered):
            rt = runtime()
            while gathered:
                p, before = gathered.pop()
                if rt is not None and p.requires_grad and torch.is_grad_enabled():
                    # a training call: autograd saved the parameter itself, and its
                    # backward reads it; whole until the micro-step ends (rt.step)
                    rt.eager_held[id(p)] = (p, before)
                else:
                    p.data = before

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles
