"""``deepspeed.moe.utils``: the parameter-group helper scripts import whether or not they use
Mixture-of-Experts (DeepSpeed's CIFAR example imports it at the top). zerofx has no MoE
layers (``deepspeed.moe.layer`` is refused at import), so a model reaching this has none:
its groups come back as DeepSpeed returns groups without expert parameters.
"""
from __future__ import annotations

from zerofx.config import ConfigError


def is_moe_param(param) -> bool:
    """DeepSpeed marks expert parameters ``allreduce = False``."""
    return getattr(param, "allreduce", True) is False


def split_params_into_different_moe_groups_for_optimizer(param_groups,
                                                         max_group_size=178956971):
    """DeepSpeed's: expert parameters into groups of their own. Without experts, the groups
    as a list of dicts (a dict or tuple given is normalised as DeepSpeed does)."""
    if isinstance(param_groups, dict):
        param_groups = [param_groups]
    elif isinstance(param_groups, tuple):
        param_groups = list(param_groups)
    elif not isinstance(param_groups, list):  # an iterator of parameters, as some scripts pass
        param_groups = [{"params": list(param_groups)}]
    for group in param_groups:
        group["params"] = list(group["params"])
        if any(is_moe_param(p) for p in group["params"]):
            raise ConfigError("expert (MoE) parameters reached zerofx: Mixture-of-Experts "
                              "layers are not part of zerofx")
    return param_groups
