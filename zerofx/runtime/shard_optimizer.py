"""Any torch optimizer, run on this rank's ZeRO shard.

For optimizers zerofx has no fused kernel for (SGD, Adagrad, ...) and for parameter groups
with their own hyperparameters. Each group's parameters become Parameters that view the
pieces of the fp32 master shard they own, with gradients viewing one fp32 gradient shard, and
a new instance of the user's optimizer class (same defaults, same group hyperparameters) steps
them. Optimizer state is thereby sharded like the fused path's.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn


class ShardOptimizer:
    """The user's optimizer class over views of this rank's master shard."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, named, plan, master: torch.Tensor):
        self.grads = torch.zeros_like(master)
        name_of = {id(p): n for n, p in named}
        groups = []
        for group in optimizer.param_groups:
            pieces = []
            for p in group["params"]:
                if id(p) in name_of:
                    pieces += [_piece(o, master, self.grads)
                               for o in plan.owned_pieces_of(name_of[id(p)])]
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({"params": pieces, **hyper})
        # A rank may own nothing of a group; torch rejects only an optimizer with no params.
        kept = [g for g in groups if g["params"]] or [{"params": [nn.Parameter(master[:0])]}]
        self.inner = type(optimizer)(kept, **_constructor_defaults(optimizer))
        self.base_lrs = [g["lr"] for g in self.inner.param_groups]
        self.base_lr = float(optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def step(self, grad: torch.Tensor, coef: torch.Tensor, lr: torch.Tensor) -> None:
        """Unscale and clip ``grad`` into the pieces' gradients, follow the schedule, step."""
        torch.mul(grad, coef, out=self.grads)
        # A schedule moves the first group's lr; every group keeps its ratio to it.
        ratio = float(lr) / self.base_lr if self.base_lr else 1.0
        for g, base in zip(self.inner.param_groups, self.base_lrs):
            g["lr"] = base * ratio
        self.inner.step()


def _constructor_defaults(optimizer) -> dict:
    """The defaults the optimizer's constructor accepts (some classes store derived ones,
    e.g. AdamW's decoupled_weight_decay, that their __init__ does not take)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in accepted}


def _piece(owned, master, grads) -> nn.Parameter:
    """A Parameter viewing one owned piece of the master shard (updates land in it)."""
    piece = nn.Parameter(master[owned.at:owned.at + owned.numel])
    piece.grad = grads[owned.at:owned.at + owned.numel]
    return piece
