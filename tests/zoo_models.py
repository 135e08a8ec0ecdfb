"""Models written the way people write them, not for zerofx: graph breaks, host reads,
branches on values, aliases, frozen and unused parameters, code Dynamo does not compile.

Each ``forward(x, y)`` returns a scalar loss; ``zoo_batch(seed)`` makes its inputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

D = 12


class Breaks(nn.Module):
    """An explicit graph break, a ``.item()`` host read, and a branch on a tensor value
    that goes different ways on different ranks (their batches differ)."""

    def __init__(self):
        super().__init__()
        self.inp, self.pos, self.neg, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, y):
        h = torch.tanh(self.inp(x))
        torch._dynamo.graph_break()
        scale = 1.0 + 0.1 * h.mean().item()  # read on the host: another break
        h = h * scale
        h = self.pos(h) if x.mean() > 0 else self.neg(h)  # data-dependent control flow
        return F.mse_loss(self.out(h), y)


class Shared(nn.Module):
    """Tied weights (one tensor under two names), a frozen layer, an unused layer, and an
    alias of a bias (BERT's ``cls.predictions.bias`` is ``decoder.bias``)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(D, D)
        self.dec = nn.Linear(D, D)
        self.dec.weight = self.enc.weight  # tied
        self.bias_alias = self.dec.bias  # same Parameter, second name
        self.frozen = nn.Linear(D, D)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(D, D)  # never called: zero gradient, as under DeepSpeed

    def forward(self, x, y):
        h = torch.relu(self.frozen(self.enc(x)))
        out = F.linear(h, self.enc.weight.t(), self.bias_alias)  # reached under other names
        return F.mse_loss(self.dec(out), y)


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class EagerPart(nn.Module):
    """A custom autograd.Function and a submodule Dynamo is told not to compile: its
    parameters get their gradients from eager autograd."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    @torch._dynamo.disable
    def _eager(self, h):
        return torch.sigmoid(self.b(h))

    def forward(self, x, y):
        h = _Cube.apply(torch.tanh(self.a(x)))
        h = self._eager(h)
        return F.mse_loss(self.c(h), y)


class Loop(nn.Module):
    """A graph break inside a loop over blocks: Dynamo compiles ``_Block.forward`` once and
    calls that one graph for every block, each time with other parameters."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(4))

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return F.mse_loss(x, y)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


ZOO = {"breaks": Breaks, "shared": Shared, "eager": EagerPart, "loop": Loop}


def make_zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name]()


def zoo_batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
