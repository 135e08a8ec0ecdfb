"""ZeroRuntime: the per-model training state of ZeRO stages 0-3, laid out by the plan.

    rt = ZeroRuntime(model, config)            # params become views of one flat buffer
    model = torch.compile(model, backend="zero", options={"config": config, "runtime": rt})
    loss = model(x, y); loss.backward()        # backward hands buckets to rt (reduce_bucket)
    rt.step()                                  # the optimizer-step graph, at the boundary

A façade over named parts, each handed explicitly to those who use it:
    rt.state     TrainState: flat buffers, fp32 optimizer state, step counters (train_state.py)
    rt.carriers  ParamCarriers: the parameters' carriers and identities (carriers.py)
    rt.comm      CommContext: groups, collective forms, shared memory, log (comm/context.py)
    rt.intake    GradIntake: gradients in, bucket collectives started (grad_intake.py)
    rt.gatherer  ParamGather: stage 3's bucket all-gathers (param_gather.py; None below)
What it keeps itself: the micro-step count and the accumulation boundary, the step program
and its builders, and the skip reports.
"""
from __future__ import annotations

import contextlib
import logging
import time
import weakref

import torch
import torch.distributed as dist
from torch import nn

import zerofx.graph_ops as graph_ops
from zerofx.config import Config, ConfigError
from zerofx.lr_schedules import make_schedule
from zerofx.plan import Plan, make_plan
from zerofx.runtime import eager_gather, input_casts
from zerofx.runtime.carriers import ParamCarriers
from zerofx.runtime.comm.context import CommContext
from zerofx.runtime.comm.dist import init_distributed
from zerofx.runtime.comm.placement import device_of, gather_group, groups
from zerofx.runtime.grad_intake import GradIntake
from zerofx.runtime.host_malloc import release_freed
from zerofx.runtime.loss_scaler import LossScaler
from zerofx.runtime.model_checks import (TrainedSet, refuse_sparse_gradients,
                                         refuse_unsupported_dtypes)
from zerofx.runtime.offload import open_offload
from zerofx.runtime.offload.params import open_params
from zerofx.runtime.optimizer_spec import OptimizerSpec
from zerofx.runtime.param_gather import ParamGather
from zerofx.runtime.shard_optimizer import ShardOptimizer
from zerofx.runtime.start_state import (agree_random_stream, agreed_matmul_forms,
                                        broadcast_model)
from zerofx.runtime.train_state import TrainState
from zerofx.runtime.user_optimizer import check_tested_optimizer, drive
from zerofx.tp.layout import TPLayout, TPPlanError, resolve_tp_layout

log = logging.getLogger(__name__)

class ZeroRuntime:
    """The training state of one model: a façade over its parts (see the module doc)."""

    def __init__(self, model: nn.Module, config=None, *, optimizer=None, mpu=None,
                 example_inputs=None):
        """``example_inputs``: what the model is called with (a dict of keyword arguments
        or a tuple), for tensor parallelism without a plan: the layout is read from the
        graph of one run on them (tp/layout.py). A Hugging Face model's ``dummy_inputs``
        serve when none are given."""
        self.config = Config.from_any(config)
        # before the flat states and the first step allocate (when the config asks):
        # freed host blocks go back
        release_freed(self.config.zerofx.host_mmap_threshold)
        world = init_distributed()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("the model has no trainable parameters for zerofx to optimize")
        refuse_sparse_gradients(model)
        refuse_unsupported_dtypes(named)
        # Every buffer and step-state tensor lives where the parameters do (one device).
        self.device = device_of(named)
        layout, split = _tp_layout(model, named, self.config, mpu, example_inputs)
        self.plan: Plan = make_plan(named, self.config, rank=world.rank,
                                    world_size=world.world_size, tp_layout=layout,
                                    mp_params=split,
                                    keep_whole=eager_gather.eager_only_params(model, named))
        self.spec = OptimizerSpec.from_config_or_torch(self.config, optimizer)
        check_tested_optimizer(self.config, optimizer)
        group, tp_group = groups(self.plan, mpu) if world.world_size > 1 else (None, None)
        # Every rank starts from rank 0's weights and compiles rank 0's program.
        broadcast_model(model, split=split, dp_group=group)
        agree_random_stream(tp_group)  # dropout on replicated activations: one mask
        self.matmul_forms = agreed_matmul_forms(self.config.zerofx.matmul_form)
        # Stage 3's own group: the graphs' parameter gathers never pair with bucket
        # collectives in flight on the data-parallel group (runtime/param_gather.py).
        param_group = gather_group(self.plan) if self.plan.partitioned and group is not None \
            else None
        self.comm = CommContext.build(self.plan, self.config, self.device, group=group,
                                      tp_group=tp_group, param_group=param_group)
        self.gas = self.config.accumulation_steps(self.plan.grid.dp_size)
        # DeepSpeed's split of the 1/dp averaging around the reduction: the factor applied
        # before it (prescale_gradients: all of it); the step divides by the rest.
        factor = self.config.pre_reduce_factor
        self.pre_reduce = 1.0 / self.plan.grid.dp_size if factor is None else factor
        self.micro_steps = 0
        # An explicit accumulation boundary (DeepSpeed's set_gradient_accumulation_boundary,
        # the engine's no_sync): the answer for every micro-step until changed; None: every
        # gas-th micro-step ends a window.
        self.boundary: bool | None = None
        self.state = TrainState.allocate(
            self.plan, self.device, scaler=LossScaler.from_config(self.config.fp16,
                                                                   device=self.device),
            lr=self.spec.lr, beta1=self.spec.beta1, gas=self.gas,
            offload=open_offload(self.config, self.plan, self.spec, self.device),
            params=open_params(self.config, self.plan, self.device))
        self.carriers = ParamCarriers(model, named, self.plan)
        self.carriers.install(named, self.state)  # fills the master (and its file)
        self.gatherer = ParamGather(self.plan, self.state, self.comm) \
            if self.plan.partitioned else None
        self.intake = GradIntake(self.plan, self.state, self.comm, pre_reduce=self.pre_reduce,
                                 is_boundary=_boundary_of(weakref.ref(self)))
        # The config's LR schedule, stepped here after each applied step (DeepSpeed's
        # last_batch_iteration=-1 start: its k-th step uses lr_at(k - 1)); an engine given
        # a scheduler of the user's drives that one instead (drop_schedule).
        self.schedule = make_schedule(self.config.scheduler, last_batch_iteration=-1,
                                      base_lr=self.spec.lr) \
            if self.config.scheduler is not None else None
        self._schedule_skips = 0  # skipped steps already seen by the schedule
        self.apply_schedule()
        _warn_unused_momentum(self.config, self.schedule, optimizer, self.plan.rank)
        self._skips_reported = 0
        self._scale_before = self.state.scaler.scale.clone()
        self._loss_scaled = False  # fp16: the loss went through backward() this micro-step
        self.comm_wait_s = 0.0
        self._step_builder = None  # given by the backend: traces the optimizer-step graph
        self._fallback_builder = None  # the engine's, for a model Dynamo compiled nothing of
        self._step_program = None  # that graph, built at the first step
        self.eager_held: dict = {}  # {id: (param, its empty value)} whole for a backward
        self._hooks: list = _hook_eager_grads(named, self.plan, self.carriers, self.intake,
                                              self.eager_held)
        # Stage 3: a module called eagerly gathers its weights; TP pieces refuse eager calls.
        self._hooks += eager_gather.install(self, model)
        if self.plan.compute_dtype != torch.float32:  # convolutions and RNNs: autocast's cast
            self._hooks += input_casts.install(model, self.plan.compute_dtype)
        self.shard_optimizer = ShardOptimizer(optimizer, named=named, plan=self.plan,
                                              master=self.state.master) \
            if self.spec.kind == "torch" else None
        self.trained = TrainedSet(model)
        self.id = graph_ops.register(self)
        if optimizer is not None:
            drive(optimizer, self)

    def close(self) -> None:
        """Detach from the model: its hooks (eager gradients, stage-3 eager gathers, input
        casts) are removed; compiled graphs of this runtime must not run again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.state.close()  # an offloaded state's disk space

    # ---- parameters ---------------------------------------------------------------------
    @contextlib.contextmanager
    def shape_carriers(self):
        """Give tensor-parallel and (stage 3) partitioned parameters their full shape while
        the model is traced or run (a context manager).

        The model's code is written for whole weights (``qkv(x).split(C)``, ``view(B, T,
        heads, C // heads)``), so Dynamo traces it with full-shape stand-ins that own one
        element; the tensor_parallel pass makes the graph read the local shard instead
        (``zerofx.tp_param``) and fixes its shapes. Outside this context the parameters are
        the local shards, as in Megatron. Every call swaps the same stand-ins in, so Dynamo's
        guards hold and nothing recompiles. At stage 3 the zero3 pass makes the graph read
        the gathered bucket instead, and outside calls a partitioned parameter is an empty
        tensor (DeepSpeed's convention; ``gathered_parameters`` gives it its value).
        Under bf16/fp16 the call also runs in ``input_casts.LowPrecisionOps`` (batched
        matmuls and attention given mixed dtypes take the compute dtype, as under autocast).
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.carriers.shape_carriers())
            if self.plan.compute_dtype != torch.float32:
                stack.enter_context(input_casts.LowPrecisionOps(self.plan.compute_dtype))
            yield

    @contextlib.contextmanager
    def gathered_parameters(self, params=None, modifier_rank: int | None = None):
        """DeepSpeed's ``GatheredParameters``: inside, the stage-3 parameters ``params`` (all
        by default; a collective, every rank enters) hold their whole values, for eager code
        (an eval loop without compile, printing, a state_dict). With ``modifier_rank``, that
        data-parallel rank's changes are kept: broadcast and written into every rank's shards
        on exit. (With tensor parallelism a weight zerofx split is this rank's whole piece,
        and each piece's data-parallel group takes it from its own rank ``modifier_rank``.)"""
        if self.gatherer is None:
            yield
            return
        carried = self.carriers.carried(params)
        whole = self.gatherer.whole_params([n for n, _, _ in carried])
        for n, p, _ in carried:
            p.data = whole[n]
        try:
            yield
        finally:
            if modifier_rank is not None:
                self._write_back([(n, p.data) for n, p, _ in carried], modifier_rank)
            for _, p, empty in carried:
                p.data = empty

    def named_partitioned(self) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of every stage-3 parameter that lives as shards."""
        if self.gatherer is None:
            return []
        return [(n, p) for n, p, _ in self.carriers.carried()]

    @torch.no_grad()
    def _write_back(self, values, src: int) -> None:
        grid = self.plan.grid  # src: a data-parallel rank; broadcast takes a global one
        src = src * grid.tp_size + grid.tp_rank(self.plan.rank)
        for name, value in values:
            if self.comm.group is not None:
                dist.broadcast(value, src=src, group=self.comm.group)
            flat = value.reshape(-1)
            with self.state.optimizer_state("update") as fp32, \
                    self.state.param_shard() as lowp:  # offloaded: read, written back
                for o in self.plan.owned_pieces_of(name):
                    piece = flat[o.start:o.start + o.numel]
                    fp32["master"][o.at:o.at + o.numel].copy_(piece)
                    lowp[o.at:o.at + o.numel].copy_(piece)

    def local_param(self, name: str) -> torch.Tensor:
        """This rank's piece of parameter ``name``: a view of the flat compute-dtype buffer."""
        return self.state.local_param(self.plan, name)

    def param_name(self, tensor) -> str | None:
        """The plan's name of a trained parameter, by identity (aliases share one name)."""
        return self.carriers.name_of(tensor)

    @property
    def aliases(self) -> dict[str, tuple[str, ...]]:
        """{plan name: the other names model.state_dict() uses for the same tensor}."""
        return self.carriers.aliases

    # ---- what the passes and dumps read -------------------------------------------------
    def pass_facts(self) -> dict:
        """What the passes read of this runtime's choices: collective forms and their cost
        (for the dumps), and rank 0's CPU matmul forms."""
        return {"comm_kinds": self.comm.kinds(), "comm_cost": self.comm.cost,
                "matmul_forms": self.matmul_forms}

    def log_comm_to(self, dump_root: str) -> None:
        """Time every collective started here from now on, into the dump at ``dump_root``
        (runtime/comm/log.py); the backend calls it when a dump is on."""
        self.comm.log_to(dump_root, self.plan.rank)

    def describe_forms(self) -> str:
        """The dump's lines on how this runtime's buckets and shards move."""
        return self.comm.describe()

    @property
    def tp_group_name(self) -> str | None:
        return self.comm.tp_group_name

    @property
    def is_boundary(self) -> bool:
        """Whether the backward now running ends an accumulation window (``boundary`` when
        set, else every ``gas``-th micro-step)."""
        if self.boundary is not None:
            return self.boundary
        return (self.micro_steps + 1) % self.gas == 0

    # ---- what the graphs call (graph_ops.TrainingState) ---------------------------------
    def slot_of(self, tensor: torch.Tensor) -> int:
        """The plan index of the trained parameter whose storage ``tensor`` is (-1: none)."""
        return self.carriers.slot_of(tensor)

    def check_reused_graph(self, slots, traced) -> None:
        """A graph runs with other parameters than it was traced with (one graph for every
        block of a loop): fine for gradients, wrong for tensor-parallel pieces, which the
        graph reads by the traced names."""
        if self.plan.grid.tp_size > 1:
            moved = [self.plan.params[t].name for s, t in zip(slots, traced) if s != t]
            raise ConfigError(
                f"one compiled graph runs for several modules (a graph break inside a loop "
                f"over blocks? it was traced with {moved[:2]}), but tensor parallelism "
                f"reads each weight's pieces by name: remove the graph break (set "
                f"zerofx.fullgraph true to find it)")

    def expect(self, slots) -> None:
        """A compiled forward ran: its parameters' gradients will come from its backward."""
        self.intake.expect(slots)

    def take(self, slots, grads) -> None:
        """One backward graph's gradients (see GradIntake)."""
        self.intake.take(slots, grads)

    @property
    def step_gathers(self):
        """The optimizer step's chunked all-gathers (zerofx.start_gather / finish_gather)."""
        return self.comm.step_gathers

    def wait_buckets(self) -> None:
        t0 = time.perf_counter()
        self.intake.wait()
        self.comm_wait_s += time.perf_counter() - t0  # what backward did not hide

    # ---- backward -----------------------------------------------------------------------
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the fp16 loss scale (``loss`` itself otherwise), to call
        ``.backward()`` on: torch.amp.GradScaler's spelling of ``rt.backward(loss)``."""
        if not self.config.fp16.enabled:
            return loss
        self._loss_scaled = True
        return loss * self.state.scaler.scale.to(device=loss.device, dtype=loss.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with fp16 loss scaling applied at the loss, as DeepSpeed does.

        The scale multiplies the loss itself (a device tensor, no host read), so gradients
        are scaled exactly once however many graphs the model breaks into.
        """
        self.scale(loss).backward()

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> bool:
        """Count a micro-step; at the accumulation boundary run the optimizer step.

        Returns whether an update was attempted (it may still be skipped on overflow).
        """
        boundary = self.is_boundary
        self._check_loss_scaled()
        self.trained.refuse_changes()
        eager_gather.release_held(self)
        self.micro_steps = _next_micro_step(self.micro_steps, self.gas, boundary)
        if not boundary:
            self.intake.end_micro_step(boundary=False)
            return False
        if self._step_program is None:
            build = self._step_builder or self._fallback_builder
            if build is None:
                raise RuntimeError(
                    "ZeroRuntime.step() before any compiled graph: "
                    + ("Dynamo ran every gradient-producing part of the model eagerly (a "
                       "graph break, e.g. nn.LSTM, made it skip the frames); use "
                       "zerofx.initialize(model=..., config=...), which steps such models, or "
                       if self.intake.eager_slots else "")
                    + "compile the model with torch.compile(model, backend='zero', "
                    "options={'runtime': rt}) and call backward before step")
            self._step_program = build()
        self._report_skip(self.update_steps - 1)
        self._scale_before.copy_(self.state.scaler.scale)
        if self.gatherer is not None:
            self.gatherer.drain()  # no gather may read the shard the step rewrites
        self._step_program(*self.state.step_inputs().tensors())
        self.intake.end_micro_step(boundary=True)
        self._advance_schedule()
        if self.comm.log is not None:
            self.comm.log.step_done()
        return True

    def apply_schedule(self) -> None:
        """The config schedule's lr (and OneCycle's beta1) for the next step: host-to-device
        writes, as the step graph reads tensors."""
        if self.schedule is None:
            return
        self.set_lr(self.schedule.get_last_lr()[0])
        momentum = self.schedule.momentum_at(self.schedule.last_batch_iteration)
        if momentum is not None:
            self.set_beta1(momentum)

    def drop_schedule(self) -> None:
        """A scheduler of the user's drives the lr: the config's is not stepped here."""
        self.schedule = None

    def _advance_schedule(self) -> None:
        """DeepSpeed steps its scheduler only after an applied step (an fp16 overflow's skip
        leaves the lr schedule where it was): it reads the overflow flag on the host, and
        so does this (the one host read a schedule costs per step)."""
        if self.schedule is None:
            return
        skipped = int(self.state.skipped)
        if skipped == self._schedule_skips:
            self.schedule.step()
            self.apply_schedule()
        self._schedule_skips = skipped

    def _check_loss_scaled(self) -> None:
        if self.config.fp16.enabled and not self._loss_scaled:
            raise ConfigError(
                "fp16 loss scaling is applied at the loss: call rt.backward(loss) or "
                "rt.scale(loss).backward() (or, with zerofx.initialize, "
                "engine.backward(loss)) instead of loss.backward()")
        self._loss_scaled = False

    def _report_skip(self, step_no: int) -> None:
        """Log the previous step if it was skipped (rank 0), one step late on purpose.

        Reading the skip counter right after the step would stall on its result; a step
        later it is long computed, so the host read costs nothing.
        """
        if self._step_program is None:
            return
        scaler = self.state.scaler
        if int(scaler.floor_hits):  # every rank: the same device state everywhere
            scaler.floor_hits.zero_()
            raise LossScaleError(
                f"fp16 loss scale is at its minimum (min_loss_scale {scaler.min_scale:g}) "
                f"and the gradients still overflow (step {step_no} skipped, parameters "
                f"untouched): DeepSpeed stops here too. Lower the learning rate, fix the "
                f"inf/NaN in the model or data, lower min_loss_scale, or use bf16")
        if self.plan.rank != 0:
            return
        skipped = int(self.state.skipped)
        if skipped > self._skips_reported:
            self._skips_reported = skipped
            log.warning("overflow: step %d skipped (loss scale %g -> %g), %d skipped so far",
                        step_no, float(self._scale_before), self.loss_scale, skipped)

    @property
    def step_program(self):
        """The optimizer-step graph (None before the first step), for dumps and tests."""
        return self._step_program

    # ---- what other layers may set (the runtime's whole writable surface) ------------------
    def offer_step_builder(self, build, *, fallback: bool = False) -> None:
        """The backend offers how to trace the optimizer step (``build() -> GraphModule``),
        run at the first step outside Dynamo's tracing; the first offer is kept. The engine
        offers a ``fallback``, used when no graph was compiled (Dynamo left the whole model
        eager: every gradient came through the eager hooks)."""
        if fallback:
            self._fallback_builder = build
        elif self._step_builder is None:
            self._step_builder = build

    def set_lr(self, lr: float) -> None:
        """The next step's learning rate (a device write: the step graph reads a tensor)."""
        self.state.lr.fill_(lr)

    def set_beta1(self, beta1: float) -> None:
        """The next step's Adam beta1 (OneCycle's momentum cycle)."""
        self.state.beta1.fill_(beta1)

    def restore_counters(self, *, step_count, lr, skipped, scaler: dict, micro_steps: int,
                         saved_gas: int) -> None:
        """Step counters from a checkpoint: the same number of optimizer steps when the
        accumulation count changed with the data-parallel size."""
        self.state.step_count.copy_(step_count)
        self.state.lr.copy_(lr)
        self.state.skipped.copy_(skipped)
        self.state.scaler.load_state_dict(scaler)
        self.micro_steps = micro_steps // saved_gas * self.gas
        self.mark_skips_reported()  # the loaded skips are old news
        self._schedule_skips = int(self.state.skipped)

    @property
    def update_steps(self) -> int:
        """Optimizer steps attempted (accumulation boundaries reached)."""
        return self.micro_steps // self.gas

    def mark_skips_reported(self) -> None:
        """Treat every skip counted so far as logged (e.g. skips restored from a checkpoint)."""
        self._skips_reported = int(self.state.skipped)

    def flush_report(self) -> None:
        """Log a skip of the last step now (e.g. at the end of training)."""
        self._report_skip(self.update_steps)

    def state_bytes(self) -> int:
        """Bytes of training state this rank holds: parameters, gradients, optimizer state."""
        return self.state.bytes()

    @property
    def loss_scale(self) -> float:
        return float(self.state.scaler.scale)

    @property
    def skipped_steps(self) -> int:
        return int(self.state.skipped)


class LossScaleError(RuntimeError):
    """Overflow with the dynamic loss scale already at min_loss_scale."""


def _hook_eager_grads(named, plan: Plan, carriers: ParamCarriers, intake: GradIntake,
                      held: dict) -> list:
    """Gradients autograd accumulates into ``p.grad`` (a parameter used outside any
    compiled graph) go to the buckets too, and ``p.grad`` stays None. ``held``: the stage-3
    parameters an eager training call gathered (eager_gather), whose gradients are of their
    real values. Returns the handles."""
    intake = weakref.ref(intake)  # the hooks outlive nothing: a dropped runtime is freed

    def hook(p):
        it = intake()
        if it is None or p.grad is None:
            return
        i = carriers.index_of(p)
        slot = plan.params[i]
        if slot.tp is not None:
            raise ConfigError(f"tensor-parallel parameter {slot.name} got a gradient "
                              f"outside the compiled graphs (it ran eagerly); zerofx "
                              f"splits weights only inside compiled graphs")
        if plan.partitioned and not slot.persistent and id(p) not in held:
            raise ConfigError(f"ZeRO-3 parameter {slot.name} was read outside the "
                              f"compiled graphs (it ran eagerly, on a stand-in, not its "
                              f"value): zerofx gathers partitioned weights only inside "
                              f"compiled graphs; remove the graph break around its use "
                              f"or raise stage3_param_persistence_threshold above its "
                              f"size ({slot.numel})")
        it.take_eager(i, p.grad)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for _, p in named]


def _warn_unused_momentum(config: Config, schedule, optimizer, rank: int) -> None:
    """OneCycle's momentum cycle moves beta1 of the fused kernels; a user's own optimizer
    class does not read it."""
    if schedule is not None and schedule.momentum_at(0) is not None and \
            optimizer is not None and rank == 0:
        log.warning("scheduler %s: cycle_momentum is not applied to %s (only to the "
                    "config's Adam/AdamW/Lamb); set cycle_momentum false to silence this",
                    config.scheduler.type, type(optimizer).__name__)


def _next_micro_step(micro: int, gas: int, boundary: bool) -> int:
    """The micro-step count after a step, kept so that ``micro // gas`` counts the windows
    ended (update_steps, checkpoint tags) and ``micro % gas`` is the place in the open one,
    also when an explicit boundary ends a window early (the count jumps to the next window)
    or holds it open past ``gas`` micro-steps (it stays at the window's last place)."""
    if boundary:
        return (micro // gas + 1) * gas
    return min(micro + 1, micro // gas * gas + gas - 1)


def _boundary_of(runtime):
    """``is_boundary`` of the runtime behind the weak reference ``runtime`` (the intake it
    owns must not keep it alive: a dropped runtime is freed at once, graph_ops' rule)."""
    return lambda: runtime().is_boundary


def _tp_layout(model, named, config: Config, mpu, example_inputs):
    """The tensor-parallel layout zerofx applies, or (with ``mpu``) the one the model has."""
    if mpu is None:
        return resolve_tp_layout(model, config, example_inputs), frozenset()
    _check_mpu_methods(mpu)
    if config.tensor_parallel.size > 1:
        raise TPPlanError("both an mpu and tensor_parallel.size > 1 were given: with an mpu "
                          "the model is already split; drop the tensor_parallel block")
    # Megatron marks its split parameters; the rest are replicated across the TP group.
    split = frozenset(n for n, p in named if getattr(p, "tensor_model_parallel", False)
                      or getattr(p, "model_parallel", False))
    return TPLayout(mpu.get_model_parallel_world_size(), {}, ()), split


def _check_mpu_methods(mpu) -> None:
    want = ("get_model_parallel_rank", "get_model_parallel_world_size",
            "get_model_parallel_group", "get_data_parallel_rank",
            "get_data_parallel_world_size", "get_data_parallel_group")
    missing = [m for m in want if not callable(getattr(mpu, m, None))]
    if missing:
        raise ConfigError(f"mpu lacks Megatron's method(s) {missing}; an mpu must provide "
                          f"{', '.join(want)}")
