"""Data parallelism for plain ``torch.compile(model, backend="zero")``: the user's own loop
and optimizer, gradients averaged across ranks as DDP does.

Without a ZeroRuntime the gradients belong to the user (``param.grad``, stepped by any torch
optimizer), so they are averaged where autograd leaves them: each parameter's
post-accumulate-grad hook marks it ready; a bucket (``reduce_bucket_size`` elements) starts
its all-reduce once all its parameters are ready, strictly in bucket order (collectives pair
by order across ranks); the end of backward launches the rest, waits, and writes the
averages back into ``param.grad``. A parameter without a gradient on a rank counts as zero
there, as in the ZeRO runtime (its ``.grad`` becomes the average everywhere).

The layout is agreed, not assumed. Parameters are named by the module whose forward is
compiled (every parameter of it, used by this graph or not: ranks compile different graphs
when a branch goes different ways on their batches), or, for a compiled function, by the
graph's inputs. At the first hook of every synchronised backward the ranks check (one tiny
all-reduce) whether any learned new parameters; if so they exchange names, shapes and which
names are one tensor, and all build the same buckets over the union. A parameter that some
rank holds and another cannot name (a compiled function whose branches read different
parameters) is refused on every rank at once.

Accumulation: a backward inside ``zerofx.no_sync(model)`` only accumulates locally; the next
backward outside it averages the accumulated sum, DDP's convention. Averaging is linear and
already-averaged gradients are equal on every rank, so accumulating without ``no_sync`` is
correct too, only slower.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zerofx.config import ConfigError
from zerofx.plan import group_into_buckets
from zerofx.runtime.start_state import broadcast_model, broadcast_tensors


@dataclass(frozen=True)
class _Group:
    """One tensor of the agreed layout: every name any rank knows it by."""

    names: tuple[str, ...]
    numel: int
    dtype: torch.dtype


class PlainDataParallel:
    """Gradient averaging over the default process group for the params handed to attach()."""

    def __init__(self, bucket_numel: int):
        self.bucket_numel = bucket_numel
        self.world = dist.get_world_size()
        self.sync = True
        self._by_name: dict[str, weakref.ref] = {}  # what this rank's graphs read
        self._order: dict[str, int] = {}  # name -> when this rank first saw it
        self._hooked: set[int] = set()
        self._dirty = False  # learned names the agreed layout does not have yet
        self.groups: list[_Group] = []
        self.buckets: list[list[int]] = []  # group indices, the order collectives run in
        self._local: list[weakref.ref | None] = []  # group -> this rank's tensor
        self._ready: set[int] = set()
        self._launched = 0
        self._pending: list = []
        self._in_backward = False
        self.device = None  # where placeholders for parameters this rank lacks are made
        self._roots = 0  # modules seen whose parameters were not all known yet

    def attach_module(self, module) -> None:
        """Every trainable parameter of ``module`` (the compiled frame's ``self``), named as
        in the first module seen that holds it (the model; a block of it keeps the model's
        names)."""
        known = {id(r()): n for n, r in self._by_name.items() if r() is not None}
        if any(id(p) not in known for p in module.parameters()):
            self._roots += 1
        prefix = "" if self._roots <= 1 else f"<module {self._roots}>."
        self.attach((known.get(id(p), prefix + n), p) for n, p in module.named_parameters())

    def attach(self, named_params) -> None:
        """Average these (name, parameter) pairs' gradients from the next agreement on."""
        for name, p in named_params:
            if not p.requires_grad or name in self._by_name:
                continue
            self._by_name[name] = weakref.ref(p)
            self.device = self.device or p.device
            self._order[name] = len(self._order)
            self._dirty = True
            if id(p) not in self._hooked:
                self._hooked.add(id(p))
                p.register_post_accumulate_grad_hook(self._hook)

    # ---- the agreed layout -----------------------------------------------------------------
    def _agree(self) -> None:
        flag = torch.tensor([int(self._dirty)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._dirty = False
        if not flag.item():
            return
        alive = {n: r() for n, r in self._by_name.items()}
        tensors: dict[int, list[str]] = {}
        for n, p in alive.items():
            if p is not None:
                tensors.setdefault(id(p), []).append(n)
        mine = [(sorted(names), alive[names[0]].numel(), str(alive[names[0]].dtype),
                 min(self._order[n] for n in names)) for names in tensors.values()]
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine)
        self._rebuild(everyone)

    def _rebuild(self, everyone: list) -> None:
        parent: dict[str, str] = {}

        def root(n):
            while parent.setdefault(n, n) != n:
                n = parent[n]
            return n

        facts: dict[str, tuple] = {}
        first: dict[str, tuple] = {}
        for rank, entries in enumerate(everyone):
            for names, numel, dtype, order in entries:
                for n in names:
                    if facts.setdefault(n, (numel, dtype)) != (numel, dtype):
                        raise ConfigError(
                            f"parameter {n} is {facts[n]} on one rank and {(numel, dtype)} on "
                            f"rank {rank}: every rank must train the same model")
                    first[n] = min(first.get(n, (rank, order)), (rank, order))
                    parent[root(n)] = root(names[0])
        merged: dict[str, list[str]] = {}
        for n in facts:
            merged.setdefault(root(n), []).append(n)
        groups = sorted((sorted(v) for v in merged.values()),
                        key=lambda names: (min(first[n] for n in names), names[0]))
        # Backward produces the last layers' gradients first: buckets in reverse order.
        self.groups = [_Group(tuple(g), *_numel_dtype(facts[g[0]])) for g in reversed(groups)]
        self._local = []
        for g in self.groups:
            found = {id(p): p for p in (self._by_name[n]() for n in g.names
                                        if n in self._by_name) if p is not None}
            if len(found) > 1:
                raise ConfigError(f"{list(g.names)} are one tensor on some rank but different "
                                  f"tensors here: every rank must train the same model")
            self._local.append(weakref.ref(next(iter(found.values()))) if found else None)
        lacking = [g.names[0] for g, ref in zip(self.groups, self._local) if ref is None]
        flag = torch.tensor([int(bool(lacking))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank refuses, none waits
        if flag.item():
            raise ConfigError(
                f"plain torch.compile on {self.world} ranks: some rank trains a parameter "
                f"another cannot name ({lacking[:3] or 'see the other ranks'}), so their "
                f"gradients cannot be averaged. Compile the nn.Module (torch.compile(model)) "
                f"rather than a function, or use zerofx.initialize")
        order = [(i, g.numel) for i, g in enumerate(self.groups)]
        self.buckets = [[i for i, _ in b] for b in group_into_buckets(order, self.bucket_numel)]

    # ---- one backward --------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if not self.sync or self not in _DP:  # no_sync, or reset() since (a dropped model)
            return
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._agree()
        self._ready.add(id(p))
        while self._launched < len(self.buckets) and self._complete(self._launched):
            self._launch(self._launched)

    def _tensor(self, i: int):
        """This rank's live tensor of group ``i`` (None: it lacks or freed it)."""
        ref = self._local[i]
        return ref() if ref is not None else None

    def _complete(self, b: int) -> bool:
        for i in self.buckets[b]:
            p = self._tensor(i)
            if p is not None and id(p) not in self._ready:
                return False
        return True

    def _launch(self, b: int) -> None:
        pieces = []
        for i in self.buckets[b]:
            g = self.groups[i]
            p = self._tensor(i)
            grad = p.grad if p is not None else None
            pieces.append(grad.reshape(-1).to(g.dtype) if grad is not None else
                          torch.zeros(g.numel, dtype=g.dtype, device=self.device))
        flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        self._pending.append((b, flat, dist.all_reduce(flat, async_op=True)))
        self._launched = b + 1

    @torch.no_grad()
    def _finish(self) -> None:
        """End of backward: launch what is left in order, wait, write the averages back."""
        try:
            for b in range(self._launched, len(self.buckets)):
                self._launch(b)
            for b, flat, work in self._pending:
                work.wait()
                flat.div_(self.world)
                at = 0
                for i in self.buckets[b]:
                    numel = self.groups[i].numel
                    p = self._tensor(i)
                    if p is not None:
                        avg = flat[at:at + numel].view_as(p)
                        if p.grad is None:
                            p.grad = avg.clone()
                        else:
                            p.grad.copy_(avg)
                    at += numel
        finally:
            self._pending.clear()
            self._ready.clear()
            self._launched = 0
            self._in_backward = False


def _numel_dtype(fact: tuple) -> tuple[int, torch.dtype]:
    numel, dtype = fact
    return numel, getattr(torch, dtype.removeprefix("torch."))


# One per process: the plain path has no object of the user's to hang it on.
_DP: list[PlainDataParallel] = []


def attach(named_params, *, bucket_numel: int, module=None) -> PlainDataParallel:
    """The process's PlainDataParallel (made on first use), now covering ``module``'s
    parameters, or ``named_params`` (a graph's own) when no module is known. On first use
    every rank also takes rank 0's weights."""
    named_params = tuple(named_params)
    if not _DP:
        _DP.append(PlainDataParallel(bucket_numel))
        # The first training graph, compiled by every rank at its first forward (the same
        # frame everywhere): DDP's start, every rank from rank 0's weights and buffers,
        # before any of them is read. Runs inside AOTAutograd's tracing: real tensors.
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            if module is not None:
                broadcast_model(module)
            else:
                broadcast_tensors([p for _, p in named_params])
    if module is not None:
        _DP[0].attach_module(module)
    else:
        _DP[0].attach(named_params)
    return _DP[0]


def reset() -> None:
    """Forget every parameter (a new model follows); every rank must call it."""
    _DP.clear()


@contextlib.contextmanager
def no_sync(model=None):
    """Backward passes inside only accumulate ``param.grad`` locally (DDP's ``no_sync``);
    the first backward after it averages the accumulated gradients. ``model`` is accepted
    for DDP's spelling and not needed: the setting is the process's."""
    dp = _DP[0] if _DP else None
    if dp is None:
        yield
        return
    previous, dp.sync = dp.sync, False
    try:
        yield
    finally:
        dp.sync = previous
