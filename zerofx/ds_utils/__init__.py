"""``deepspeed.utils``: the helpers DeepSpeed scripts import, on zerofx's runtime.

    from deepspeed.utils import logger, log_dist, groups          # after zerofx.as_deepspeed()
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    dist_log      logger, log_dist, log_dist_once, print_dist, set_log_level_from_string
    groups        data/tensor-parallel group helpers, from the runtime's layout
    full_state    safe_get_full_fp32_param / _grad / _optimizer_state, gathered from shards
    memory        see_memory_usage
    repeating_loader  RepeatingLoader
    zero_to_fp32  get_fp32_state_dict_from_zero_checkpoint over zerofx's checkpoints

What DeepSpeed's ``utils`` has beyond these is one AttributeError naming it and why.
"""
from zerofx.ds_utils import groups, zero_to_fp32
from zerofx.ds_utils.dist_log import (log_dist, log_dist_once, logger, print_dist,
                                      set_log_level_from_string)
from zerofx.ds_utils.full_state import (safe_get_full_fp32_param, safe_get_full_grad,
                                        safe_get_full_optimizer_state)
from zerofx.ds_utils.memory import see_memory_usage
from zerofx.ds_utils.repeating_loader import RepeatingLoader

__all__ = ["groups", "zero_to_fp32", "logger", "log_dist", "log_dist_once", "print_dist",
           "set_log_level_from_string", "safe_get_full_fp32_param", "safe_get_full_grad",
           "safe_get_full_optimizer_state", "see_memory_usage", "RepeatingLoader"]

# DeepSpeed's utils names zerofx does not provide: why, and what to use instead.
_NOT_PROVIDED = {
    "safe_set_full_fp32_param": "writing one parameter into the shards is not supported: "
                                "use deepspeed.zero.GatheredParameters(p, modifier_rank=0)",
    "safe_set_full_optimizer_state": "writing optimizer state by parameter is not supported",
    "safe_set_full_grad": "writing gradients by parameter is not supported",
    "safe_update_full_grad_vectorized": "writing gradients by parameter is not supported",
    "safe_get_local_fp32_param": "ZeRO-3 local partitions by parameter are not exposed: use "
                                 "safe_get_full_fp32_param",
    "safe_get_local_grad": "ZeRO-3 local partitions by parameter are not exposed: use "
                           "safe_get_full_grad",
    "safe_get_local_optimizer_state": "ZeRO-3 local partitions by parameter are not exposed: "
                                      "use safe_get_full_optimizer_state",
    "OnDevice": "building on the meta device is torch's: use `with torch.device('meta')`",
    "set_z3_leaf_modules": "zerofx's stage 3 gathers per bucket inside the compiled graphs: "
                           "there are no leaf modules to mark",
    "instrument_w_nvtx": "NVTX ranges are not part of zerofx",
}


def __getattr__(name):
    if name in _NOT_PROVIDED:
        raise AttributeError(f"deepspeed.utils.{name}: {_NOT_PROVIDED[name]} (zerofx)")
    raise AttributeError(f"module 'deepspeed.utils' (zerofx) has no attribute {name!r}")
