"""What a job needs per rank before it runs, and how long its step takes, from a model built
without weights (fake tensors) and zerofx's own layout and graphs (``zerofx-plan``,
tools/plan.py).

    memory.py     bytes by kind (model states, communication buffers, activations saved
                  for the backward, the graphs' working tensors, ZeRO-3's gathered
                  parameters, the step's temporary, the compiled graphs' own resident
                  bytes) and the peak, when they live together
    offload.py    what optimizer and parameter offload (NVMe, host) take out of memory,
                  the files' bytes, the host's, and the bytes moved per step
    graphs.py     per traced forward/backward pair: saved bytes, the live-bytes peak of
                  each graph, FLOPs and memory traffic, read from the partitioned graphs
    step_time.py  the predicted step time: each op priced by its class at the device's
                  rates, page faults, the optimizer step, the collectives the plan implies
                  through comm_cost's model
    rates.py      the op classes, and their rates: timed on this host (once per process),
                  or a GPU's data sheet times assumed efficiencies

    split.py      with tensor parallelism, the tensor_parallel pass in the trace (a
                  stand-in for the runtime's weight pieces, no process group)

The model is built under a fake-tensor mode: shapes and dtypes, no storage. Tensor
parallelism divides the split weights per the layout (tensor_parallel.plan, or found on the
traced graph, fake tensors and all), and the graphs traced are the rank's split ones
(split.py): activations, working peaks, FLOPs, traffic and the TP all-reduces are one
tensor-parallel rank's. With activation_checkpointing.partition_activations the values that
pass would cut are counted as 1/tp (graphs.partitioned: the pass needs a runtime, so it
does not run in the trace; its rules are applied to the split pair).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from zerofx.config import Config, ConfigError
from zerofx.config.deepspeed_keys import FORCE_HOST_OFFLOAD_ENV
from zerofx.passes import PassSpec
from zerofx.plan import make_plan
from zerofx.planner.graphs import GraphFacts, graph_facts, partitioned, saved_activation_bytes
from zerofx.planner.memory import (RankMemory, activation_peak, comm_buffers, compiled_bytes,
                                   gathered_bytes, model_states)
from zerofx.planner.offload import OffloadFacts, offload_facts
from zerofx.planner.split import split_passes
from zerofx.tp.layout import resolve_tp_layout

__all__ = ["GraphFacts", "OffloadFacts", "RankMemory", "plan_rank", "read_config",
           "model_states", "trace_graphs", "saved_activation_bytes"]


def plan_rank(build, config, example, *, world: int, rank: int = 0,
              shm: bool = False, gpu: bool = False) -> tuple:
    """(RankMemory, Plan) of ``rank`` in a job of ``world`` ranks. ``build()`` makes the
    model; it runs under a fake-tensor mode, so no weight is allocated (a 70B model plans on
    a laptop). ``example``: one micro-batch's keyword (dict) or positional (tuple) inputs,
    small real tensors (ids, labels), made fake here; or a function of the built model that
    returns them (inputs read from its config). ``shm``: the ranks are on one host of a CPU
    job, so the shared-memory collective form (and its buffers) may be chosen. ``gpu``: the
    parameters are on a GPU (offload_optimizer cpu then moves the state to the host; NVMe
    offload is refused there, as the runtime refuses it)."""
    config = read_config(config, gpu=gpu)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = build()
    example = _fake(example(model) if callable(example) else example, mode)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layout = resolve_tp_layout(model, config, example)
    plan = make_plan(named, config, rank=rank, world_size=world, tp_layout=layout)
    offload = offload_facts(plan, config, gpu=gpu)
    graphs = trace_graphs(model, config, example, plan)
    if config.activation_checkpointing.partition_activations:
        graphs = [partitioned(g, plan.grid.tp_size) for g in graphs]
    saved, working = activation_peak(graphs)
    mem = RankMemory(**model_states(plan, config, offload), activations=saved,
                     working=working, gathered=gathered_bytes(plan, config, offload),
                     comm_buffers=comm_buffers(plan, config, shm=shm), graphs=graphs,
                     compiled=compiled_bytes(graphs), compiled_on_host=gpu, offload=offload)
    return mem, plan


def read_config(source, *, gpu: bool) -> Config:
    """``source`` read as on the ranks' machines: with ``gpu``, offload_optimizer device
    cpu is kept (ZeRO-Offload), where a CPU-only reader drops it (the state is in host
    memory already: config/deepspeed_keys._host_offload), as its forcing switch keeps it."""
    if not gpu or isinstance(source, Config):
        return Config.from_any(source)
    old = os.environ.get(FORCE_HOST_OFFLOAD_ENV)
    os.environ[FORCE_HOST_OFFLOAD_ENV] = "1"
    try:
        return Config.from_any(source)
    finally:
        if old is None:
            del os.environ[FORCE_HOST_OFFLOAD_ENV]
        else:
            os.environ[FORCE_HOST_OFFLOAD_ENV] = old


def _fake(obj, mode):
    if isinstance(obj, torch.Tensor):
        return mode.from_tensor(obj)
    if isinstance(obj, dict):
        return {k: _fake(v, mode) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fake(v, mode) for v in obj)
    return obj


def trace_graphs(model: nn.Module, config: Config, example, plan) -> list[GraphFacts]:
    """GraphFacts of each forward/backward pair of one traced training micro-step of
    ``plan``'s rank: with tensor parallelism, its split graphs (planner/split.py)."""
    traced = Config.from_dict({
        "bf16": {"enabled": config.bf16.enabled}, "fp16": {"enabled": config.fp16.enabled},
        "zero_optimization": {"reduce_bucket_size":
                              config.zero_optimization.reduce_bucket_size},
        "zerofx": {"activation_memory_budget": config.zerofx.activation_memory_budget}})
    seen: list[GraphFacts] = []

    def record(pair, ctx):
        def bucket_of(name):
            try:
                return ctx.plan.slot(name).bucket
            except KeyError:
                return None
        seen.append(graph_facts(pair[0], pair[1], ctx.num_fwd_outputs, ctx.roles, bucket_of))
        return pair

    import zerofx.backend  # noqa: F401  backend="zero" in a checkout that is not installed

    handed: set = set()  # split weights whose (local) gradient the backward made
    with _params_in(model, plan.compute_dtype), \
            split_passes(plan, config, model, handed) as split:
        try:
            compiled = torch.compile(model, backend="zero", options={
                "config": traced, "extra_passes": (*split, PassSpec(
                    "plan_saved", record, frozenset({"partitioned"})))})
            args, kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
            out = compiled(*args, **kwargs)
            loss = _loss_of(out)
            loss.backward()  # on fake tensors: nothing computed, the backward graph traced
        finally:
            torch._dynamo.reset()  # the traced graphs hold fake tensors: not for reuse
    lacking = [n for n, p in model.named_parameters()
               if p.requires_grad and p.grad is None and n not in handed]
    if lacking or not seen:  # never a silent zero: the backward was not traced through
        what = lacking[:3] or "the parameters"
        raise ConfigError(f"zerofx-plan traced no backward reaching {what}: the loss must "
                          f"depend on every trained parameter (freeze the others: "
                          f"requires_grad=False)")
    return seen


@contextlib.contextmanager
def _params_in(model: nn.Module, dtype):
    """The runtime stores parameters in the compute dtype: trace them so (no casts)."""
    old = {p: p.data for p in model.parameters() if p.requires_grad}
    for p in old:
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in old.items():
            p.data = data


def _loss_of(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        loss = out if isinstance(out, torch.Tensor) else None
    if loss is None or loss.dim() != 0:
        raise ConfigError("zerofx-plan traces one training step: the model must return its "
                          "loss (a scalar, or an output with .loss); pass labels in the "
                          "example inputs")
    return loss
