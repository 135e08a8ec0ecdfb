"""``deepspeed.zero``: what scripts call around ZeRO-3's partitioned parameters.

    with zerofx.zero.GatheredParameters(model.lm_head.weight, modifier_rank=0):
        if engine.global_rank == 0:
            model.lm_head.weight.normal_()     # rank 0's change reaches every rank's shard

``GatheredParameters`` finds the ZeroRuntime that trains the given parameters and gathers
them whole for the block (a collective: every data-parallel rank enters it), with
``modifier_rank``'s changes written back on exit (ZeroRuntime.gathered_parameters). For
parameters no runtime partitions (stages 0-2, or not trained by zerofx) it does nothing, as
DeepSpeed's does for parameters without ZeRO-3 state.

``Init`` is DeepSpeed's context that creates parameters partitioned, so a model larger than
one rank's memory can be built. zerofx builds the model whole and partitions it when
``zerofx.initialize`` (its ZeroRuntime) takes it: inside ``Init`` nothing changes, and the
first use says so once: peak memory at construction is the whole model on every rank.
"""
from __future__ import annotations

import contextlib
import logging

import torch

import zerofx.graph_ops as graph_ops

log = logging.getLogger(__name__)
_SAID: set = set()


class GatheredParameters(contextlib.ContextDecorator):
    """DeepSpeed's ``zero.GatheredParameters(params, modifier_rank=None, fwd_module=None,
    enabled=True)``: ``params`` whole inside (see the module doc)."""

    def __init__(self, params, modifier_rank: int | None = None, fwd_module=None,
                 enabled: bool = True):
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params = [p for p in (params or []) if isinstance(p, torch.Tensor)]
        self.modifier_rank, self.enabled = modifier_rank, enabled
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        if not self.enabled or not self.params:
            return self
        for rt in graph_ops.registered():
            mine = [p for p in self.params if rt.param_name(p) is not None]
            if mine and getattr(rt, "gatherer", None) is not None:
                self._stack.enter_context(rt.gathered_parameters(mine, self.modifier_rank))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


class Init(contextlib.ContextDecorator):
    """DeepSpeed's ``zero.Init(...)``: accepted with its arguments; parameters are created
    whole and partitioned by ``zerofx.initialize`` (see the module doc)."""

    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=True,
                 remote_device=None, pin_memory=False, config_dict_or_path=None, config=None,
                 enabled=True, dtype=None, mpu=None, **kwargs):
        self.enabled = enabled
        if remote_device not in (None, "none", "cpu"):
            from zerofx.config import ConfigError

            raise ConfigError(f"zero.Init(remote_device={remote_device!r}): zerofx creates "
                              f"parameters in memory and partitions them at initialize; "
                              f"for stage 3's shard on NVMe set zero_optimization."
                              f"offload_param {{\"device\": \"nvme\"}} in the config")

    def __enter__(self):
        if self.enabled and "init" not in _SAID:
            _SAID.add("init")
            log.warning("zero.Init: zerofx creates parameters whole and partitions them when "
                        "zerofx.initialize takes the model (peak memory at construction is "
                        "the whole model on every rank)")
        return self

    def __exit__(self, *exc):
        return False


def register_external_parameter(module, parameter) -> None:
    """DeepSpeed's hook for a parameter used outside its module: zerofx's graphs gather what
    they read wherever it is read, so there is nothing to register."""
