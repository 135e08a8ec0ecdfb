"""The seam between the graphs and the runtime: the ops a pass puts into a graph and the
runtime carries out, defined once here and imported by both sides (docs/design.md, "The
seam").

    graph side   a pass builds a call with its op's typed builder, by keyword, and reads or
                 updates an existing call by field name:
                     g = GATHER_BUCKET.call(graph, sid=..., slots=..., ks=..., offsets=...,
                                            length=..., ahead=[], check=0)
                     GATHER_BUCKET.read(g).length;  GATHER_BUCKET.update(g, ahead=[...])
                 The fields are the op's own schema arguments, so each op's arguments are
                 written once: in its signature below.
    runtime side ``register(state)`` hands out the integer id graphs carry (a graph cannot
                 hold a Python object); the ops look the state up and call the methods
                 ``TrainingState`` lists: the whole interface the graphs see.

Why opaque custom ops and not visible functional collectives: a bucket's reduction or a
stage-3 gather must survive graph breaks (a model Dynamo splits into several graphs, eager
code between them) and belong to the runtime's buckets, which span graphs; an opaque op
hands its tensors to the runtime, which owns the buffers, the collective form and the wait.

The registry holds weak references: a runtime that the user drops is freed, and its id is
never reused.
"""
from __future__ import annotations

import itertools
import weakref
from collections import namedtuple
from typing import Any, Protocol

import torch
from torch import fx
from torch.fx.node import has_side_effect


class TrainingState(Protocol):
    """What the ops read of the state a graph names by id (the runtime's graph-facing side).
    ``gatherer`` (stage 3) and ``step_gathers`` (the step's all-gathers) are the runtime's
    parameter-gathering parts; ``shard_optimizer`` its user-optimizer adapter."""

    plan: Any
    device: torch.device
    gatherer: Any
    step_gathers: Any
    shard_optimizer: Any

    def slot_of(self, param: torch.Tensor) -> int: ...
    def check_reused_graph(self, slots: list[int], traced: list[int]) -> None: ...
    def expect(self, slots: list[int]) -> None: ...
    def take(self, slots: list[int], grads: list[torch.Tensor]) -> None: ...
    def wait_buckets(self) -> None: ...
    def local_param(self, name: str) -> torch.Tensor: ...


class IdTable:
    """Live objects by an int id, held weakly: graph ops take ints, not objects, so a
    compiled graph names the runtime (or offloaded state) it drives by its id here."""

    def __init__(self, what: str, keep: str):
        self.what, self.keep = what, keep  # for the error: what is gone, what to keep alive
        self._live: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
        self._ids = itertools.count(1)

    def add(self, obj) -> int:
        i = next(self._ids)
        self._live[i] = obj
        return i

    def lookup(self, i: int):
        obj = self._live.get(i)
        if obj is None:
            raise RuntimeError(f"zerofx {self.what} {i} no longer exists: keep {self.keep}")
        return obj

    def values(self) -> list:
        return list(self._live.values())


_RUNTIMES = IdTable("training state", "the ZeroRuntime alive as long as the compiled model "
                                      "is used")


def register(state: TrainingState) -> int:
    return _RUNTIMES.add(state)


def registered() -> list:
    """Every live registered state (zerofx.zero finds the runtime owning a parameter)."""
    return _RUNTIMES.values()


def lookup(sid: int) -> TrainingState:
    return _RUNTIMES.lookup(sid)


@torch.library.custom_op("zerofx::param_slots", mutates_args=())
def param_slots(sid: int, params: list[torch.Tensor], traced: list[int],
                kept: list[int]) -> torch.Tensor:
    """Which trained parameters this call of a graph reads, as plan indices (-1: not
    trained), found by storage address: one compiled graph may run for several modules
    (a loop of blocks Dynamo resumes in), so the answer belongs to the call, not the graph.
    A small int64 CPU tensor, saved for the backward of the same call. ``traced``: the
    indices the graph was traced with; ``kept``: those of tensor-parallel weights, which the
    graph reads by name (their slots stay as traced, in ``traced``'s order)."""
    rt = lookup(sid)
    found, kept = iter([rt.slot_of(p) for p in params]), set(kept)
    slots = [t if t in kept else next(found) for t in traced]
    if slots != traced:
        rt.check_reused_graph(slots, traced)
    return torch.tensor(slots, dtype=torch.int64)


@param_slots.register_fake
def _(sid, params, traced, kept):
    return torch.empty(len(traced), dtype=torch.int64, device="cpu")


@torch.library.custom_op("zerofx::expect_grads", mutates_args=())
def expect_grads(sid: int, slots: torch.Tensor) -> torch.Tensor:
    """A training forward ran: its backward will bring gradients of ``slots`` (returned,
    copied, for that backward to read)."""
    lookup(sid).expect([i for i in slots.tolist() if i >= 0])
    return slots.clone()


@expect_grads.register_fake
def _(sid, slots):
    return torch.empty_like(slots)


@torch.library.custom_op("zerofx::tag_grad", mutates_args=())
def tag_grad(grad: torch.Tensor, slots: torch.Tensor, position: int) -> torch.Tensor:
    """Marks the gradient of the ``position``-th parameter of the call ``slots`` describes;
    the bucketing pass replaces it by a reduce_bucket (it only exists between the passes)."""
    return grad.clone()


@tag_grad.register_fake
def _(grad, slots, position):
    return torch.empty_like(grad)


@torch.library.custom_op("zerofx::reduce_bucket", mutates_args=())
def reduce_bucket(sid: int, slots: torch.Tensor, positions: list[int],
                  grads: list[torch.Tensor | None]) -> None:
    """Hand gradients to the runtime: ``grads[k]`` belongs to parameter ``slots[positions[k]]``
    of this call. The runtime adds them into their buckets and, on an accumulation boundary,
    starts a bucket's collective (async) once all of its gradients of the step are in."""
    index = slots.tolist()
    pairs = [(index[k], g) for k, g in zip(positions, grads) if index[k] >= 0]
    lookup(sid).take([i for i, _ in pairs], [g for _, g in pairs])


@reduce_bucket.register_fake
def _(sid, slots, positions, grads):
    return None


@torch.library.custom_op("zerofx::wait_buckets", mutates_args=())
def wait_buckets(sid: int) -> None:
    """Block until every bucket collective started in backward has finished."""
    lookup(sid).wait_buckets()


@wait_buckets.register_fake
def _(sid):
    return None


@torch.library.custom_op("zerofx::shard_optimizer_step", mutates_args=())
def shard_optimizer_step(sid: int, grad: torch.Tensor, coef: torch.Tensor, lr: torch.Tensor,
                         skip: torch.Tensor) -> None:
    """Step the user's (unfused) torch optimizer on this rank's shard, unless ``skip``.

    The one place the step reads a value on the host: a torch optimizer cannot be skipped
    on the device. The fused Adam/LAMB path never does.
    """
    if not bool(skip):
        lookup(sid).shard_optimizer.step(grad, coef, lr)


@shard_optimizer_step.register_fake
def _(sid, grad, coef, lr, skip):
    return None


@torch.library.custom_op("zerofx::tp_param", mutates_args=())
def tp_param(sid: int, name: str) -> torch.Tensor:
    """This rank's piece of tensor-parallel parameter ``name`` (the tensor_parallel pass reads
    it in place of the full-shape stand-in Dynamo traced). A view, never a copy: the
    all-gather of the step writes it, and forward only reads it."""
    return lookup(sid).local_param(name)


@tp_param.register_fake
def _(sid, name):
    rt = lookup(sid)  # shapes only: no real tensor may be touched under fake mode
    return torch.empty(rt.plan.slot(name).shape, dtype=rt.plan.compute_dtype,
                       device=rt.device)


@torch.library.custom_op("zerofx::gather_bucket", mutates_args=())
def gather_bucket(sid: int, slots: torch.Tensor, ks: list[int], offsets: list[int],
                  length: int, ahead: list[int], check: int) -> torch.Tensor:
    """ZeRO-3: parameters ``slots[k]`` (k in ``ks``) whole, parameter ``ks[j]`` at
    ``offsets[j]`` of one ``length``-element tensor (normally their gathered bucket itself);
    the buckets of the parameters at positions ``ahead`` start gathering (prefetch). Read
    only: the graph slices its parameters out of it. ``check`` (non-zero on a graph's first
    gather): the graph's gather sequence, compared across ranks before any of it runs."""
    gatherer = lookup(sid).gatherer
    slots = slots.tolist()
    if check:
        gatherer.check_same_graph(check, slots)
    return gatherer.bucket(slots, ks, offsets, length, ahead)


@gather_bucket.register_fake
def _(sid, slots, ks, offsets, length, ahead, check):
    rt = lookup(sid)
    return torch.empty(length, dtype=rt.plan.compute_dtype, device=rt.device)


@torch.library.custom_op("zerofx::start_gather", mutates_args=("flat",))
def start_gather(sid: int, flat: torch.Tensor, chunk: int) -> None:
    """Start exchanging chunk ``chunk`` of the step's gathers in place in the flat
    parameters ``flat``: this rank's rows (updated) go out, the other ranks' rows come in
    (runtime/comm/forms.StepGathers)."""
    lookup(sid).step_gathers.start(chunk, flat)


@torch.library.custom_op("zerofx::finish_gather", mutates_args=("flat",))
def finish_gather(sid: int, flat: torch.Tensor, chunk: int, numel: int) -> None:
    """Wait until every rank's rows of chunk ``chunk`` (``numel`` elements in all) are in
    ``flat``."""
    lookup(sid).step_gathers.finish(chunk)


# Ops without outputs would be dead code to FX; they act by side effect.
for _op in (torch.ops.zerofx.reduce_bucket.default, torch.ops.zerofx.wait_buckets.default,
            torch.ops.zerofx.shard_optimizer_step.default):
    has_side_effect(_op)


class SeamOp:
    """One seam op as the passes see it: build a call by keyword, read or update one by
    field name. The fields are the op's schema arguments (``args`` is their namedtuple)."""

    def __init__(self, name: str):
        self.name = name
        self.target = getattr(torch.ops.zerofx, name).default
        self.args = namedtuple(f"{name}_args", [a.name for a in self.target._schema.arguments])

    def __call__(self, *args, **kwargs):
        """Run the op eagerly (the step function's calls, traced into the step graph)."""
        return self.target(*args, **kwargs)

    def call(self, graph: fx.Graph, **fields) -> fx.Node:
        """A new call of this op at the graph's insertion point; every field by name."""
        return graph.call_function(self.target, tuple(self.args(**fields)))

    def is_call(self, node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_function" and \
            node.target is self.target

    def read(self, node: fx.Node):
        """The call's arguments by field name (``read(node).length``)."""
        assert self.is_call(node), f"{node} is not a call of zerofx::{self.name}"
        return self.args(*node.args, **node.kwargs)

    def update(self, node: fx.Node, **changes) -> None:
        """Replace some of the call's arguments, by field name."""
        node.args, node.kwargs = tuple(self.read(node)._replace(**changes)), {}


PARAM_SLOTS = SeamOp("param_slots")
EXPECT_GRADS = SeamOp("expect_grads")
TAG_GRAD = SeamOp("tag_grad")
REDUCE_BUCKET = SeamOp("reduce_bucket")
WAIT_BUCKETS = SeamOp("wait_buckets")
SHARD_OPTIMIZER_STEP = SeamOp("shard_optimizer_step")
TP_PARAM = SeamOp("tp_param")
GATHER_BUCKET = SeamOp("gather_bucket")
START_GATHER = SeamOp("start_gather")
FINISH_GATHER = SeamOp("finish_gather")
