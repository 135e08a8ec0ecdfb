"""What a job needs per rank before it runs, from a model built without weights (fake
tensors) and zerofx's own layout and graphs (``zerofx-plan``, tools/plan.py).

    model states   the flat buffers exactly as TrainState allocates them for the plan of the
                   requested world size (the same code, on the meta device): parameters in
                   the compute dtype (stage 3: this rank's shard plus the persistent
                   buckets), gradients (the all-reduce / accumulation buffer and the
                   reduce-scatter shard) and the optimizer state (fp32 master, exp_avg,
                   exp_avg_sq)
    step temporary stages 1-2 build the updated compute-dtype shard before gathering it
    activations    what the forward graphs of one traced micro-step save for the backward:
                   zerofx's passes (casts), the config's partitioner, activation budget and
                   checkpointed regions, read from the partitioned graphs; parameters and
                   their views are not counted (no memory of their own)
    gathered       ZeRO-3's whole parameters alive at once: at most stage3_max_live_parameters
                   elements, and at least the largest bucket a graph reads whole
    peak           their sum

The model is built under a fake-tensor mode: shapes and dtypes, no storage.

Tensor parallelism divides the split weights per the layout (tensor_parallel.plan, or found
on the traced graph, fake tensors and all); activations are those of one tensor-parallel
rank's graph as traced whole, an upper bound. Step time is not predicted yet.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from zerofx.config import Config, ConfigError
from zerofx.passes import PassSpec
from zerofx.passes.nodes import is_cast, is_view
from zerofx.plan import Plan, make_plan
from zerofx.runtime.loss_scaler import LossScaler
from zerofx.runtime.train_state import TrainState, nbytes
from zerofx.tp.layout import resolve_tp_layout

GIB = float(1 << 30)


@dataclass
class RankMemory:
    """Bytes one rank holds, by kind (see the module doc)."""

    parameters: int
    gradients: int
    optimizer: int
    step_temporary: int
    activations: int
    gathered: int
    graphs: list[int] = field(default_factory=list)  # saved bytes per traced forward graph

    @property
    def peak(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.step_temporary + \
            self.activations + self.gathered

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer states", self.optimizer), ("step temporary", self.step_temporary),
                ("activations saved for backward", self.activations),
                ("ZeRO-3 gathered parameters", self.gathered), ("peak", self.peak)]


def plan_rank(build, config, example, *, world: int, rank: int = 0) -> tuple:
    """(RankMemory, Plan) of ``rank`` in a job of ``world`` ranks. ``build()`` makes the
    model; it runs under a fake-tensor mode, so no weight is allocated (a 70B model plans on
    a laptop). ``example``: one micro-batch's keyword (dict) or positional (tuple) inputs,
    small real tensors (ids, labels), made fake here; or a function of the built model that
    returns them (inputs read from its config)."""
    config = Config.from_any(config)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = build()
    example = _fake(example(model) if callable(example) else example, mode)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layout = resolve_tp_layout(model, config, example)
    plan = make_plan(named, config, rank=rank, world_size=world, tp_layout=layout)
    states = model_states(plan, config)
    saved = activation_bytes(model, config, example, plan.compute_dtype)
    return RankMemory(**states, activations=sum(saved), gathered=_gathered(plan, config),
                      graphs=saved), plan


def _fake(obj, mode):
    if isinstance(obj, torch.Tensor):
        return mode.from_tensor(obj)
    if isinstance(obj, dict):
        return {k: _fake(v, mode) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fake(v, mode) for v in obj)
    return obj


def model_states(plan: Plan, config: Config) -> dict[str, int]:
    """Parameter, gradient, optimizer and step-temporary bytes of TrainState for ``plan``."""
    meta = torch.device("meta")
    st = TrainState.allocate(plan, meta, scaler=LossScaler.from_config(config.fp16,
                                                                       device=meta),
                             lr=0.0, beta1=0.0,
                             gas=config.accumulation_steps(plan.grid.dp_size))
    temp = plan.shard_numel * plan.compute_dtype.itemsize \
        if plan.sharded and not plan.partitioned else 0  # the step's updated low shard
    return {"parameters": nbytes(st.flat_params, st.shard_lowp),
            "gradients": nbytes(st.full_grads, st.shard_grads),
            "optimizer": nbytes(st.master, st.exp_avg, st.exp_avg_sq),
            "step_temporary": temp}


def activation_bytes(model: nn.Module, config: Config, example, dtype) -> list[int]:
    """Saved-for-backward bytes of each forward graph of one traced training micro-step."""
    traced = Config.from_dict({"bf16": {"enabled": config.bf16.enabled},
                               "fp16": {"enabled": config.fp16.enabled},
                               "zerofx": {"activation_memory_budget":
                                          config.zerofx.activation_memory_budget}})
    seen: list[int] = []

    def record(pair, ctx):
        seen.append(saved_activation_bytes(pair[0], ctx.num_fwd_outputs))
        return pair

    with _params_in(model, dtype):
        compiled = torch.compile(model, backend="zero", options={
            "config": traced, "extra_passes": (PassSpec("plan_saved", record,
                                                        frozenset({"partitioned"})),)})
        args, kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
        out = compiled(*args, **kwargs)
        loss = _loss_of(out)
        loss.backward()  # on fake tensors: nothing computed, the backward graph traced
    torch._dynamo.reset()  # the traced graphs hold fake tensors: not for reuse
    lacking = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if lacking or not seen:  # never a silent zero: the backward was not traced through
        what = lacking[:3] or "the parameters"
        raise ConfigError(f"zerofx-plan traced no backward reaching {what}: the loss must "
                          f"depend on every trained parameter (freeze the others: "
                          f"requires_grad=False)")
    return seen


def saved_activation_bytes(fw: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Bytes the forward graph saves for its backward: each saved value's storage once (a
    value and its views share one), inputs and their views (parameters, which hold no
    memory of their own) not counted."""
    bases = {}
    for o in fw.graph.output_node().args[0][num_fwd_outputs:]:
        if isinstance(o, fx.Node):
            base = _storage_owner(o)
            if base.op != "placeholder":
                bases[base] = base
    total = 0
    for base in bases:
        val = base.meta.get("val")
        if isinstance(val, torch.Tensor):
            total += int(val.numel() * val.element_size())
    return total


def _storage_owner(node: fx.Node) -> fx.Node:
    """The node whose output storage ``node`` views (itself when it owns one)."""
    while node.op == "call_function" and is_view(node) and not is_cast(node):
        node = node.all_input_nodes[0]
    return node


def _gathered(plan: Plan, config: Config) -> int:
    if not plan.partitioned:
        return 0
    largest = max((b.padded for b in plan.buckets if b.offset < plan.persist_offset),
                  default=0)
    live = max(largest, min(config.zero_optimization.stage3_max_live_parameters,
                            plan.persist_offset))
    return live * plan.compute_dtype.itemsize


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

