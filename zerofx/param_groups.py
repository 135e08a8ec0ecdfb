"""Which parameters ``zerofx.initialize`` trains, and under which hyperparameters: its
``model_parameters`` and ``optimizer`` arguments read as DeepSpeed reads them, checked
before the model is touched.

    chosen = select(model, model_parameters, optimizer, config, user_scheduler=...)
    with trained_only(model, chosen.trained):   # flags restored if the block raises
        engine = ZeroEngine(model, config, optimizer=chosen.optimizer, ...)

DeepSpeed's rule (deepspeed/runtime/engine.py): ``model_parameters`` (default
``module.parameters()``) reaches the config's optimizer constructor as given, groups
included (``_configure_basic_optimizer``: ``FusedAdam(model_parameters, **params)``), so the
config's params are defaults and each group's own keys override them; a client optimizer
object is used as it is and ``model_parameters`` is ignored, a client callable is called
with ``model_parameters`` (``_configure_optimizer``); a
parameter in two groups is an error (``_check_for_duplicates``); empty groups are dropped.
The ZeRO optimizers keep, of those, the parameters that require grad
(``runtime/utils.py: is_optimized_parameter``, read by ``stage_1_and_2.py`` and
``stage3.py: _get_trainable_parameter_groups``). DeepSpeed never changes ``requires_grad``.

zerofx trains exactly the parameters that require grad (the runtime's plan is built from
them), so a parameter DeepSpeed would leave out of the optimizer is frozen here instead; a
listed parameter that is frozen stays frozen.

The config's Adam/AdamW runs as one fused kernel with one set of hyperparameters. Groups
that agree with the config take it; groups with their own values run as the equivalent
torch optimizer (torch.optim.AdamW for adam_w_mode, torch.optim.Adam's L2 decay otherwise,
as DeepSpeed's FusedAdam) over the groups, which the runtime steps per group on its shard.
What that cannot honour (Lamb, bias_correction off, offloaded state, OneCycle's momentum,
a schedule that would overwrite each group's lr) is refused by name.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from zerofx.config import Config, ConfigError

# The group keys DeepSpeed's fused optimizers read per group (FusedAdam.step, FusedLamb.step);
# any other key stays in the group unread, as there.
ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "bias_correction")
LAMB_KEYS = ADAM_KEYS + ("max_coeff", "min_coeff", "eps_inside_sqrt")
# Keys torch's Adam/AdamW would act on that DeepSpeed's FusedAdam does not (it ignores them,
# or refuses AMSGrad): an equivalent run cannot carry them.
REFUSED_TRUE = ("amsgrad", "maximize")
# Schedules that write one absolute lr into every group (DeepSpeed's update_lr with a
# scalar from the config); WarmupCosineLR scales each group's own lr instead.
ABSOLUTE_SCHEDULES = ("WarmupLR", "WarmupDecayLR", "OneCycle", "LRRangeTest")


@dataclass
class Selection:
    """``trained``: the parameters to train (None: every one that requires grad, nothing to
    change); ``optimizer``: the torch optimizer the runtime steps (the client's, one built
    for groups with their own hyperparameters, or None: the config's, fused)."""

    trained: list[nn.Parameter] | None
    optimizer: torch.optim.Optimizer | None


def select(model: nn.Module, model_parameters, optimizer, config: Config, *,
           user_scheduler: bool) -> Selection:
    """Read ``model_parameters`` and ``optimizer`` as DeepSpeed does; raise ConfigError on
    anything zerofx cannot train as asked. Changes nothing."""
    names = {id(p): n for n, p in model.named_parameters()}  # objects alive for this call
    groups = items = None
    if model_parameters is not None:
        items, groups = _groups(model_parameters, names)
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        # DeepSpeed's client callable: called with model_parameters as given (or the
        # module's parameters), its result used as a client optimizer
        optimizer = optimizer(items if items is not None else list(model.parameters()))
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer= gave a {type(optimizer).__name__}: zerofx takes a "
                          f"torch.optim.Optimizer, a callable that builds one from "
                          f"model_parameters, or none (the config's optimizer)")
    if optimizer is not None:
        return Selection(_client_trained(model, optimizer, groups, names), optimizer)
    if groups is None:
        return Selection(None, None)
    trained = [p for g in groups for p in g["params"] if p.requires_grad]
    if not trained:
        raise ConfigError("model_parameters holds no parameter that requires grad: nothing "
                          "to train. Pass the parameters to train (requires_grad=True), or "
                          "leave model_parameters out to train every one that requires grad")
    return Selection(trained, _config_optimizer(groups, config, user_scheduler))


@contextmanager
def trained_only(model: nn.Module, trained: list[nn.Parameter] | None):
    """Freeze the model's parameters outside ``trained`` for the block and after it; if the
    block raises, every flag is as it was before (a failed initialize leaves the model as
    the user gave it)."""
    if trained is None:
        yield
        return
    keep = {id(p) for p in trained}
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(id(p) in keep and p.requires_grad)
    try:
        yield
    except BaseException:
        for p, flag in before:
            p.requires_grad_(flag)
        raise


def _groups(model_parameters, names: dict) -> tuple[list, list[dict]]:
    """``model_parameters`` as torch.optim reads it: an iterable of tensors (one group) or of
    group dicts; each group's params a list. Every parameter is the model's, listed once.
    Returns the items as given (a generator read once) and the groups."""
    if isinstance(model_parameters, (torch.Tensor, dict, set)):
        raise ConfigError(f"model_parameters is a {type(model_parameters).__name__}: pass an "
                          f"ordered iterable of parameters (model.parameters(), a list) or a "
                          f"list of groups [{{'params': [...], 'weight_decay': ...}}, ...]")
    items = list(model_parameters)  # a generator is read once, here
    if not items:
        raise ConfigError("model_parameters is empty: pass the parameters to train (or "
                          "groups of them), or leave it out to train every parameter that "
                          "requires grad")
    is_group = [isinstance(x, dict) for x in items]
    if all(is_group):
        groups, where = items, "model_parameters group {}"
    elif not any(is_group):
        groups, where = [{"params": items}], "model_parameters"
    else:
        raise ConfigError("model_parameters mixes parameters and group dicts: pass either "
                          "parameters, or a list of groups (put loose parameters in a group "
                          "of their own)")
    seen: dict[int, str] = {}
    out = []
    for i, group in enumerate(groups):
        label = where.format(i)
        if "params" not in group:
            raise ConfigError(f"{label} has no 'params' key: each group is "
                              f"{{'params': [parameters], <hyperparameters>}}")
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]  # torch.optim's reading of a single tensor
        elif isinstance(params, set):
            raise ConfigError(f"{label}'s params is a set, whose order changes between runs: "
                              f"pass a list")
        params = list(params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise ConfigError(f"{label} holds a {type(p).__name__}, not a parameter")
            if id(p) not in names:
                raise ConfigError(
                    f"{label} holds a parameter of shape {tuple(p.shape)} that is not one "
                    f"of the model's parameters (model.named_parameters()): zerofx trains the "
                    f"model's own. Build the groups from model.named_parameters() of the "
                    f"model you pass")
            if id(p) in seen:
                raise ConfigError(
                    f"parameter {names[id(p)]} is listed twice in model_parameters ({seen[id(p)]} "
                    f"and {label}): each parameter belongs to one group (DeepSpeed refuses it "
                    f"too); remove the repeat")
            seen[id(p)] = label
        out.append({**group, "params": params, "_label": label})
    return items, out


def _client_trained(model, optimizer, groups, names) -> list[nn.Parameter] | None:
    """DeepSpeed optimizes a client optimizer's parameters and ignores model_parameters;
    zerofx trains those that require grad. Given both, they must name the same ones."""
    trained = []
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise ConfigError(
                    f"optimizer group {i} holds a parameter of shape {tuple(p.shape)} that is "
                    f"not one of the model's parameters: zerofx steps the model's own. Build "
                    f"the optimizer over the parameters of the model you pass")
            if p.requires_grad:
                trained.append(p)
    if not trained:
        raise ConfigError("the optimizer holds no parameter that requires grad: nothing to "
                          "train")
    if groups is not None:
        listed = {id(p) for g in groups for p in g["params"] if p.requires_grad}
        if listed != {id(p) for p in trained}:
            raise ConfigError(
                "model_parameters and the optimizer's groups name different parameters: "
                "DeepSpeed steps the optimizer's and ignores model_parameters, which would "
                "leave this difference unnoticed. Leave model_parameters out, or pass the "
                "same parameters to both")
    every = {id(p) for p in model.parameters() if p.requires_grad}
    return None if {id(p) for p in trained} == every else trained


def _config_optimizer(groups: list[dict], config: Config, user_scheduler: bool):
    """None when every group agrees with the config's optimizer (its fused kernel runs them
    all); else the equivalent torch optimizer over the groups, or a ConfigError saying which
    group and key cannot be honoured."""
    opt = config.optimizer
    if opt is None:
        return None  # the runtime says what to add (no optimizer at all)
    keys = LAMB_KEYS if opt.type == "Lamb" else ADAM_KEYS
    live = [g for g in groups if any(p.requires_grad for p in g["params"])]
    own = []  # (group label, key, group's value, config's value)
    for g in live:
        for key, value in g.items():
            if key in REFUSED_TRUE and value:
                raise ConfigError(
                    f"{g['_label']} sets {key}=True: the config's {opt.type} runs DeepSpeed's "
                    f"FusedAdam update, which has no {key}. Remove it from the group, or pass "
                    f"your own torch optimizer (optimizer=torch.optim.AdamW(groups, {key}=True))")
            if key in keys and not _same(value, getattr(opt, key)):
                own.append((g["_label"], key, value, getattr(opt, key)))
    if not own:
        return None
    label, key, value, default = own[0]
    what = f"{label} sets {key}={value!r} (the config's is {default!r})"
    if opt.type == "Lamb":
        raise ConfigError(
            f"{what}: the config's Lamb runs as zerofx's fused kernel with one set of "
            f"hyperparameters for every parameter, and torch has no Lamb to run groups with "
            f"their own. Give every group the config's values (or drop the key), or use "
            f"Adam/AdamW, whose groups zerofx runs with their own hyperparameters")
    if not opt.bias_correction or any(o[1] == "bias_correction" for o in own):
        raise ConfigError(
            f"{what}: groups with their own hyperparameters run as torch.optim.Adam/AdamW, "
            f"which always applies bias correction; with bias_correction false (config or "
            f"group) every group must agree with the config's values")
    off = config.zero_optimization.offload_optimizer.device
    if off != "none":
        raise ConfigError(
            f"{what}: groups with their own hyperparameters run as a torch optimizer on the "
            f"shard, and offload_optimizer ({off}) runs only zerofx's fused kernel, with one "
            f"set of hyperparameters. Give every group the config's values, or set "
            f"zero_optimization.offload_optimizer.device to none")
    sched = config.scheduler
    if sched is not None and not user_scheduler:
        if sched.type == "OneCycle" and sched.params.cycle_momentum:
            raise ConfigError(
                f"{what}: scheduler OneCycle with cycle_momentum moves the fused Adam's beta1, "
                f"and groups with their own hyperparameters run as a torch optimizer that it "
                f"does not reach. Set scheduler.params.cycle_momentum false, or give every "
                f"group the config's values")
        lrs = {float(g.get("lr", opt.lr)) for g in live}
        if sched.type in ABSOLUTE_SCHEDULES and len(lrs) > 1:
            lr_label = next((g["_label"] for g in live if "lr" in g
                             and not _same(g["lr"], opt.lr)), label)
            raise ConfigError(
                f"{lr_label} sets its own lr, and scheduler {sched.type} sets every group's lr "
                f"to the same value each step (DeepSpeed's {sched.type} overwrites a group's "
                f"lr), so the group's would be ignored. Drop lr from the groups, use "
                f"WarmupCosineLR (it scales each group's own lr), or pass your own torch "
                f"lr_scheduler")
    cls = torch.optim.AdamW if opt.adam_w_mode else torch.optim.Adam
    torch_groups = [{**{k: v for k, v in g.items() if k not in ("_label", "bias_correction")},
                     "params": [p for p in g["params"] if p.requires_grad]} for g in live]
    return cls(torch_groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
               weight_decay=opt.weight_decay)


def _same(value, default) -> bool:
    """A group's value equals the config's (betas as a pair, numbers as floats)."""
    if isinstance(default, tuple):
        try:
            return tuple(float(v) for v in value) == tuple(float(v) for v in default)
        except TypeError:
            return False
    if isinstance(default, bool):
        return bool(value) == default
    try:
        return float(value) == float(default)
    except (TypeError, ValueError):
        return False
