"""The user's torch optimizer, handed to a ZeroRuntime: driven by zerofx's step, and the guard
on which optimizers ZeRO may shard."""
from __future__ import annotations

import torch

from zerofx.config import Config, ConfigError


def drive(optimizer: torch.optim.Optimizer, rt) -> None:
    """The user's optimizer, handed to the runtime, now runs zerofx's step: a loop that
    calls ``opt.step(); opt.zero_grad()`` keeps working, sharded (ZeRO) and fused. The
    first group's lr is read at every step, so a torch LR scheduler on ``optimizer`` moves
    zerofx's lr (other groups keep their ratio to it); its state lives in the runtime (save
    it with zerofx's checkpoints)."""
    def step(closure=None):
        if closure is not None:
            raise ConfigError("optimizer.step(closure) is not supported once the optimizer "
                              "is handed to zerofx: compute the loss first, then step")
        rt.set_lr(float(optimizer.param_groups[0]["lr"]))
        rt.step()

    def zero_grad(set_to_none: bool = True):
        pass  # gradients live in zerofx's buckets, cleared at every optimizer step

    optimizer.step = step
    optimizer.zero_grad = zero_grad


def check_tested_optimizer(config: Config, optimizer) -> None:
    """DeepSpeed's guard: ZeRO with an optimizer it has not tested needs the config's consent
    (each shard is stepped on its own, so per-tensor math sees pieces of tensors)."""
    if optimizer is None or config.zero_optimization.stage < 1 \
            or type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) \
            or config.zero_allow_untested_optimizer:
        return
    raise ConfigError(
        f"ZeRO stage {config.zero_optimization.stage} with {type(optimizer).__name__}, an "
        f"optimizer zerofx has no fused kernel for: it steps each rank's shard as a flat "
        f"tensor, so per-tensor math (norms, trust ratios) would see pieces. Add "
        f"\"zero_allow_untested_optimizer\": true to the config to run it anyway (as with "
        f"DeepSpeed), or use Adam/AdamW or the config's Lamb")
