"""``deepspeed.zero``: what scripts call around ZeRO-3's partitioned parameters.

    with zerofx.zero.GatheredParameters(model.lm_head.weight, modifier_rank=0):
        if engine.global_rank == 0:
            model.lm_head.weight.normal_()     # rank 0's change reaches every rank's shard

``GatheredParameters`` finds the ZeroRuntime that trains the given parameters and gathers
them whole for the block (a collective: every data-parallel rank enters it), with
``modifier_rank``'s changes written back on exit (ZeroRuntime.gathered_parameters). For
parameters no runtime partitions (stages 0-2, or not trained by zerofx) it does nothing, as
DeepSpeed's does for parameters without ZeRO-3 state.

``Init`` is DeepSpeed's context for building a model larger than one rank's memory:

    with zerofx.zero.Init(remote_device="nvme", config_dict_or_path=ds_config):
        model = GPT(...)        # every parameter in a private file under nvme_path
    engine, *_ = zerofx.initialize(model=model, config=ds_config)

With ``remote_device="nvme"`` (or, as in DeepSpeed, a config whose
``zero_optimization.offload_param.device`` is "nvme") each parameter a module registers
inside the context moves at once into a file-backed mapping (runtime/init_store.py), cast
to ``dtype`` (default: the config's bf16/fp16, else fp32, as DeepSpeed's): the model is page
cache, not anonymous memory, and ``zerofx.initialize`` reads it as it reads any model. It
partitions the parameters as always (rank 0's values, broadcast) and drops their files. The
directory is ``offload_param.nvme_path``, else ``offload_optimizer.nvme_path``; without one
``Init`` refuses (no temporary default: /tmp is often a tmpfs, i.e. memory).

``remote_device`` None or "cpu": parameters are created in memory, whole (this host's CPU is
where they would be anyway; DeepSpeed's "cpu" creates each rank's partition only, which
zerofx does not), cast to ``dtype`` only when it is given; the first use says so once.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook

import zerofx.graph_ops as graph_ops
from zerofx.config import Config, ConfigError
from zerofx.runtime.init_store import InitStore

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
    """DeepSpeed's ``zero.Init(...)`` (see the module doc). ``module``: an already built
    model whose parameters are moved at once; ``data_parallel_group``, ``mpu``,
    ``mem_efficient_linear`` and ``pin_memory`` are accepted and change nothing (zerofx
    partitions at initialize, over the config's groups)."""

    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=True,
                 remote_device=None, pin_memory=False, config_dict_or_path=None, config=None,
                 enabled=True, dtype=None, mpu=None, **kwargs):
        self.enabled = enabled
        self._hook = None
        source = config_dict_or_path if config_dict_or_path is not None else config
        cfg = Config.from_any(source) if source is not None else None
        self.remote_device = _remote_device(remote_device, cfg)
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"zero.Init(dtype={dtype}): one of torch.float32, "
                              f"torch.float16, torch.bfloat16")
        self.store = None
        if self.remote_device == "nvme" and enabled:
            root, block = _nvme_dir(cfg)
            self.store = InitStore(root, block=block, rank=int(os.environ.get("RANK", 0)),
                                   dtype=dtype or cfg.compute_dtype)
        self.dtype = dtype
        if module is not None and enabled:
            for p in module.parameters():
                self._take(p)

    def _take(self, param) -> None:
        if self.store is not None:
            self.store.adopt(param)
        elif self.dtype is not None and param.is_floating_point():
            param.data = param.data.to(self.dtype)

    def __enter__(self):
        if not self.enabled:
            return self
        if self.store is None and "init" not in _SAID:
            _SAID.add("init")
            log.warning("zero.Init: zerofx creates parameters whole in memory and partitions "
                        "them when zerofx.initialize takes the model (peak memory at "
                        "construction is the whole model on every rank); remote_device="
                        "\"nvme\" builds it in files under nvme_path instead")
        if self.store is not None or self.dtype is not None:
            def hook(module, name, param):
                if param is not None:
                    self._take(param)
            self._hook = register_module_parameter_registration_hook(hook)
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.store is not None and self.store.files:
            log.info("zero.Init: %d parameters (%.2f GiB) built in files under %s", 
                     self.store.files, self.store.bytes / 2**30, self.store.root)
        return False


def _remote_device(remote_device, cfg) -> str:
    """DeepSpeed's rule: a config's offload_param device decides; else the argument."""
    if cfg is not None and cfg.zero_optimization.offload_param.device != "none":
        remote_device = cfg.zero_optimization.offload_param.device
    remote_device = "none" if remote_device is None else str(remote_device)
    if remote_device not in ("none", "cpu", "nvme"):
        raise ConfigError(f"zero.Init(remote_device={remote_device!r}): one of None, "
                          f"\"cpu\", \"nvme\" (on this CPU-only build parameters live in "
                          f"host memory or in files)")
    return remote_device


def _nvme_dir(cfg) -> tuple[str, str]:
    """(directory, the config block naming it) for zero.Init's files."""
    zero = cfg.zero_optimization if cfg is not None else None
    for block in ("offload_param", "offload_optimizer"):
        path = getattr(zero, block).nvme_path if zero is not None else None
        if path:
            return path, block
    raise ConfigError(
        "zero.Init(remote_device=\"nvme\") needs a directory for the parameters' files: "
        "pass config_dict_or_path with zero_optimization.offload_param.nvme_path (or "
        "offload_optimizer.nvme_path) set; zerofx picks no default (/tmp is often memory)")


def register_external_parameter(module, parameter) -> None:
    """DeepSpeed's hook for a parameter used outside its module: zerofx's graphs gather what
    they read wherever it is read, so there is nothing to register."""
