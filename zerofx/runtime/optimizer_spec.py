"""Which update the sharded step runs: from the config's optimizer block or a torch optimizer.

A DeepSpeed user names the optimizer in JSON; a torch user passes ``torch.optim.Adam/AdamW``.
Both become one frozen spec holding the kernels' own hyperparameter object (AdamHyper or
LambHyper, DeepSpeed's parameter names), read once at set-up and passed to the step as is.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from zerofx.config import Config, ConfigError
from zerofx.runtime.fused_optim import AdamHyper, LambHyper


@dataclass(frozen=True)
class OptimizerSpec:
    """The update the step runs: its kind, the initial lr, and the fused kernel's own
    hyperparameter object (the one shape the kernels take; None for a torch optimizer)."""

    kind: str  # "adam" (Adam and AdamW, per adam_w_mode), "lamb", or "torch" (unfused)
    lr: float
    hyper: AdamHyper | LambHyper | None = None

    @property
    def beta1(self) -> float:
        return self.hyper.betas[0] if self.hyper is not None else 0.0

    @property
    def max_grad_norm(self) -> float:
        """LAMB's own clipping (DeepSpeed's FusedLamb); 0 for Adam and torch optimizers."""
        return getattr(self.hyper, "max_grad_norm", 0.0)

    @classmethod
    def from_config_or_torch(cls, config: Config, optimizer=None) -> "OptimizerSpec":
        spec = cls._from_config_or_torch(config, optimizer)
        sched = config.scheduler
        if sched is not None and sched.type == "OneCycle" and sched.params.cycle_momentum \
                and spec.kind != "torch":
            # DeepSpeed's OneCycle sets every group's betas to (cycle_min_mom, 0.99) and then
            # moves beta1 each step (the engine writes it into ZeroRuntime.beta1).
            spec = replace(spec, hyper=replace(spec.hyper,
                                               betas=(sched.params.cycle_min_mom, 0.99)))
        return spec

    @classmethod
    def _from_config_or_torch(cls, config: Config, optimizer=None) -> "OptimizerSpec":
        if optimizer is not None:
            return cls.from_torch(optimizer)
        opt = config.optimizer
        if opt is None:
            raise ConfigError("no optimizer: add an \"optimizer\" block to the config "
                              "(e.g. {\"type\": \"AdamW\", \"params\": {\"lr\": 1e-3}}) or "
                              "pass a torch.optim.Adam/AdamW")
        if opt.type == "Lamb":
            return cls("lamb", opt.lr, LambHyper(
                betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                bias_correction=opt.bias_correction, max_coeff=opt.max_coeff,
                min_coeff=opt.min_coeff, eps_inside_sqrt=opt.eps_inside_sqrt))
        # (the kernel's own max_grad_norm stays 0: the config clips with gradient_clipping,
        # DeepSpeed's rule)
        return cls("adam", opt.lr, AdamHyper(
            betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
            bias_correction=opt.bias_correction, adam_w_mode=opt.adam_w_mode))

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer) -> "OptimizerSpec":
        """Adam/AdamW with one set of hyperparameters run fused; anything else runs as the
        user's own optimizer class on the shard (ShardOptimizer)."""
        groups = optimizer.param_groups
        keys = ("lr", "betas", "eps", "weight_decay", "amsgrad")
        first = {k: groups[0].get(k) for k in keys}
        fusable = (type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
                   and not first["amsgrad"]
                   and all({k: g.get(k) for k in keys} == first for g in groups[1:]))
        if not fusable:
            return cls("torch", float(first["lr"]))
        return cls("adam", float(first["lr"]), AdamHyper(
            betas=tuple(first["betas"]), eps=first["eps"], weight_decay=first["weight_decay"],
            adam_w_mode=isinstance(optimizer, torch.optim.AdamW)))
