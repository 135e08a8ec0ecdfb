"""ZeroRuntime: the per-model training state of ZeRO stages 0-3, laid out by the plan.

    rt = ZeroRuntime(model, config)            # params become views of one flat buffer
    model = torch.compile(model, backend="zero", options={"config": config, "runtime": rt})
    loss = model(x, y); loss.backward()        # backward hands buckets to rt (reduce_bucket)
    rt.step()                                  # the optimizer-step graph, at the boundary

Buffers (N = data-parallel size, "shard" = what this rank updates, see plan.owned):
    flat_params   padded_numel, compute dtype: the model's parameters are views into it
                  (stage 3: only the persistent parameters' buckets; the others are
                  gathered from shard_lowp by the graphs, runtime/param_gather.py)
    master, exp_avg, exp_avg_sq   shard, fp32
    shard_lowp    shard, compute dtype: stage 3's parameters (stages 1-2: a step temporary)
    shard_grads   shard, compute dtype: reduce-scatter target (stage 2)
    full_grads    padded_numel: all-reduce target (stages 0/1) and the local accumulation
                  buffer when gradient_accumulation_steps > 1 (stage 2 keeps it only then)
"""
from __future__ import annotations

import contextlib
import logging
import time
import weakref

import torch
import torch.distributed as dist
from torch import nn

from zerofx.config import Config, ConfigError
from zerofx.plan import Plan, make_plan
from zerofx.tp.layout import TPLayout, TPPlanError, resolve_tp_layout
import zerofx.graph_ops as graph_ops
from zerofx.runtime import eager_gather, input_casts
from zerofx.runtime.comm.forms import (StepGathers, choose_forms, choose_param_gather,
                                       cost_of, shm_mirrors)
from zerofx.runtime.comm.log import CommLog
from zerofx.runtime.comm.dist import init_distributed
from zerofx.runtime.grad_intake import GradIntake
from zerofx.runtime.loss_scaler import LossScaler
from zerofx.runtime.optimizer_spec import OptimizerSpec
from zerofx.runtime.param_gather import ParamGather
from zerofx.runtime.comm.placement import device_of, gather_group, groups
from zerofx.runtime.shard_optimizer import ShardOptimizer
from zerofx.runtime.start_state import agreed_matmul_forms, broadcast_model
from zerofx.runtime.user_optimizer import check_tested_optimizer, drive
from zerofx.plan import gather_chunks
from zerofx.runtime.step_fn import StepState

log = logging.getLogger(__name__)

class ZeroRuntime:
    """Flat buffers, shards, pending collectives and step state of one model."""

    def __init__(self, model: nn.Module, config=None, *, optimizer=None, mpu=None,
                 example_inputs=None):
        """``example_inputs``: what the model is called with (a dict of keyword arguments
        or a tuple), for tensor parallelism without a plan: the layout is read from the
        graph of one run on them (tp/layout.py). A Hugging Face model's ``dummy_inputs``
        serve when none are given."""
        self.config = Config.from_any(config)
        world = init_distributed()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("the model has no trainable parameters for zerofx to optimize")
        # Every buffer and step-state tensor lives where the parameters do (one device).
        self.device = device_of(named)
        layout, split = _tp_layout(model, named, self.config, mpu, example_inputs)
        self.plan: Plan = make_plan(named, self.config, rank=world.rank,
                                    world_size=world.world_size, tp_layout=layout,
                                    mp_params=split,
                                    keep_whole=eager_gather.eager_only_params(model, named))
        self.spec = OptimizerSpec.from_config_or_torch(self.config, optimizer)
        check_tested_optimizer(self.config, optimizer)
        self.group, self.tp_group = groups(self.plan, mpu) if world.world_size > 1 \
            else (None, None)
        # Every rank starts from rank 0's weights and compiles rank 0's program.
        broadcast_model(model, split=split, dp_group=self.group)
        self.matmul_forms = agreed_matmul_forms(self.config.zerofx.matmul_form)
        # Stage 3's own group: the graphs' parameter gathers never pair with bucket
        # collectives in flight on self.group (runtime/param_gather.py).
        self.gatherer = ParamGather(self, gather_group(self.plan)) \
            if self.plan.partitioned else None
        # How buckets reduce and shards gather: each form timed once on this group, the
        # fastest kept (runtime/comm/forms.py; on gloo point-to-point beats both natives).
        self.forms = choose_forms(self.plan, self.config, self.group,
                                  reduces_into_shard=self.reduces_into_shard,
                                  device=self.device)
        if self.gatherer is not None:  # stage 3's bucket gathers, on their own group
            self.forms.update(choose_param_gather(self.plan, self.config,
                                                  self.gatherer.group, self.device))
        if self.plan.rank == 0:
            _warn_unused_pins(self.config, self.forms)
        self.comm_cost = cost_of(self.forms, self.plan.compute_dtype)
        self.comm_log = None  # with a dump on: see log_comm_to
        # The shm form's shared buffers, for the roles that chose it (runtime/comm/shm.py).
        self.shm = shm_mirrors(self.plan, self.config, self.forms, self.group,
                               self.gatherer.group if self.gatherer is not None else None)
        self.step_gathers = StepGathers(self.group, gather_chunks(self.plan, self.config),
                                        self.plan.persist_offset, mirror=self.shm.get("gather"))
        self.gas = _accumulation_steps(self.config, self.plan.grid.dp_size)
        # DeepSpeed's split of the 1/dp averaging around the reduction: the factor applied
        # before it (prescale_gradients: all of it); the step divides by the rest.
        factor = self.config.pre_reduce_factor
        self.pre_reduce = 1.0 / self.plan.grid.dp_size if factor is None else factor
        self.micro_steps = 0
        dev = self.device
        self.scaler = LossScaler.from_config(self.config.fp16, device=dev)
        self.step_count = torch.zeros((), dtype=torch.float32, device=dev)
        self.skipped = torch.zeros((), dtype=torch.int64, device=dev)
        self.grad_norm = torch.full((), float("nan"), dtype=torch.float32, device=dev)
        self._skips_reported = 0
        self._scale_before = self.scaler.scale.clone()
        self.lr = torch.tensor(self.spec.lr, dtype=torch.float32, device=dev)
        # float64: the kernels compute with beta1 in double, as torch.optim.Adam does
        self.beta1 = torch.tensor(self.spec.beta1, dtype=torch.float64, device=dev)
        self._loss_scaled = False  # fp16: the loss went through backward() this micro-step
        self.comm_wait_s = 0.0
        self._step_builder = None  # given by the backend: traces the optimizer-step graph
        self._fallback_builder = None  # the engine's, for a model Dynamo compiled nothing of
        self._step_program = None  # that graph, built at the first step
        self._names_by_id = {id(p): n for n, p in named}
        self.aliases = _aliases(model, self._names_by_id)
        self._allocate(named)
        self.intake = GradIntake(self)
        self._index_storage(named)
        self._hooks: list = []
        self._hook_eager_grads(named)
        # Stage 3: a module called eagerly gathers its weights; TP pieces refuse eager calls.
        self._hooks += eager_gather.install(self, model)
        if self.plan.compute_dtype != torch.float32:  # convolutions and RNNs: autocast's cast
            self._hooks += input_casts.install(model, self.plan.compute_dtype)
        self.shard_optimizer = ShardOptimizer(optimizer, named=named, plan=self.plan,
                                              master=self.master) \
            if self.spec.kind == "torch" else None
        self.id = graph_ops.register(self)
        if optimizer is not None:
            drive(optimizer, self)

    # ---- layout -------------------------------------------------------------------------
    def _allocate(self, named) -> None:
        plan, low, dev = self.plan, self.plan.compute_dtype, self.device
        # Stage 3 keeps only the persistent parameters whole: flat_params then covers
        # [persist_offset, padded_numel) of the layout (all of it below stage 3).
        base = plan.persist_offset
        self.flat_params = torch.zeros(plan.padded_numel - base, dtype=low, device=dev)
        self.master = torch.zeros(plan.shard_numel, dtype=torch.float32, device=dev)
        tp, tp_rank = plan.grid.tp_size, plan.grid.tp_rank(plan.rank)
        self._carriers = []  # (param, full-shape stand-in, local view): see shape_carriers
        for name, p in named:
            s = plan.slot(name)
            local = s.tp.local_piece(p.detach(), tp, tp_rank) if s.tp is not None else p.detach()
            flat = local.reshape(-1)
            for o in plan.owned_pieces_of(name):  # fp32 master copy of what this rank owns
                self.master[o.at:o.at + o.numel].copy_(flat[o.start:o.start + o.numel])
            if plan.partitioned and not s.persistent:
                # Stage 3: the graphs read the gathered bucket (zerofx.gather_bucket), never
                # this stand-in; NaN so that an eager read of it cannot pass for a weight.
                # A tensor-parallel weight is traced whole too (the tensor_parallel pass
                # splits it): its bucket holds this rank's piece.
                shape = s.tp.full_shape if s.tp is not None else s.shape
                stand_in = torch.full([1] * len(shape), float("nan"), dtype=low, device=dev)
                self._carriers.append((p, stand_in.expand(shape),
                                       torch.empty(0, dtype=low, device=dev)))
                p.data = self._carriers[-1][2]
                continue
            self.flat_params[s.offset - base:s.end - base].copy_(flat)
            # The parameter now lives in the flat buffer, in the compute dtype: the
            # all-gather writes straight into the model and no per-step cast is needed.
            p.data = self.flat_params[s.offset - base:s.end - base].view(s.shape)
            if s.tp is not None:  # one element of storage each: distinct inputs to AOT
                stand_in = torch.zeros(1, dtype=low, device=dev).view([1] * len(s.shape))
                self._carriers.append((p, stand_in.expand(s.tp.full_shape), p.data))
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        # Stage 3's parameters between uses; below it the step makes a temporary.
        self.shard_lowp = self.master.to(low) if plan.partitioned else \
            torch.empty(0, dtype=low, device=dev)
        # Stage 2 with reduce-scatter and no accumulation never holds the full gradients.
        needs_full = not self.reduces_into_shard or self.gas > 1
        self.full_grads = torch.zeros(plan.padded_numel, dtype=low, device=dev) \
            if needs_full else None
        if self.reduces_into_shard:  # the reduce-scatter's target (stage 1 slices in the step)
            self.shard_grads = torch.zeros(plan.shard_numel, dtype=low, device=dev)
        else:
            self.shard_grads = torch.empty(0, dtype=low, device=dev) if plan.sharded \
                else self.full_grads

    def _index_storage(self, named) -> None:
        index = {s.name: i for i, s in enumerate(self.plan.params)}
        self._slot_by_id = {pid: index[n] for pid, n in self._names_by_id.items()}
        self._slot_by_ptr = {p.data_ptr(): self._slot_by_id[id(p)] for _, p in named
                             if p.numel()}
        for p, full, _ in self._carriers:  # traced and run with the stand-in in place
            self._slot_by_ptr[full.data_ptr()] = self._slot_by_id[id(p)]

    @contextlib.contextmanager
    def shape_carriers(self):
        """Give tensor-parallel and (stage 3) partitioned parameters their full shape while
        the model is traced or run.

        The model's code is written for whole weights (``qkv(x).split(C)``, ``view(B, T,
        heads, C // heads)``), so Dynamo traces it with full-shape stand-ins that own one
        element; the tensor_parallel pass makes the graph read the local shard instead
        (``zerofx.tp_param``) and fixes its shapes. Outside this context the parameters are
        the local shards, as in Megatron. Every call swaps the same stand-ins in, so Dynamo's
        guards hold and nothing recompiles. At stage 3 the zero3 pass makes the graph read
        the gathered bucket instead, and outside calls a partitioned parameter is an empty
        tensor (DeepSpeed's convention; ``gathered_parameters`` gives it its value).
        """
        for p, full, _ in self._carriers:
            p.data = full
        try:
            yield
        finally:
            for p, _, local in self._carriers:
                p.data = local

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
        wanted = {id(p) for p in params} if params is not None else None
        carried = [(p, empty) for p, _, empty in self._carriers
                   if wanted is None or id(p) in wanted]
        whole = self.gatherer.whole_params([self._names_by_id[id(p)] for p, _ in carried])
        for p, _ in carried:
            p.data = whole[self._names_by_id[id(p)]]
        try:
            yield
        finally:
            if modifier_rank is not None:
                self._write_back([(self._names_by_id[id(p)], p.data) for p, _ in carried],
                                 modifier_rank)
            for p, empty in carried:
                p.data = empty

    def named_partitioned(self) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of every stage-3 parameter that lives as shards."""
        return [(self._names_by_id[id(p)], p) for p, _, _ in self._carriers
                if self.gatherer is not None]

    @torch.no_grad()
    def _write_back(self, values, src: int) -> None:
        grid = self.plan.grid  # src: a data-parallel rank; broadcast takes a global one
        src = src * grid.tp_size + grid.tp_rank(self.plan.rank)
        for name, value in values:
            if self.group is not None:
                dist.broadcast(value, src=src, group=self.group)
            flat = value.reshape(-1)
            for o in self.plan.owned_pieces_of(name):
                piece = flat[o.start:o.start + o.numel]
                self.master[o.at:o.at + o.numel].copy_(piece)
                self.shard_lowp[o.at:o.at + o.numel].copy_(piece)

    def local_param(self, name: str) -> torch.Tensor:
        """This rank's piece of parameter ``name``: a view of the flat compute-dtype buffer."""
        s = self.plan.slot(name)
        return self.flat_params[s.offset:s.end].view(s.shape)

    @property
    def norm_group(self):
        """Where the squared gradient norm is summed: over the DP shards, and over the TP
        group when weights are split (replicated weights then count 1/tp on each rank)."""
        if self.plan.grid.tp_size > 1:
            return dist.group.WORLD if self.plan.sharded else self.tp_group
        return self.group if self.plan.sharded else None

    def pass_facts(self) -> dict:
        """What the passes read of this runtime's choices: collective forms and their cost
        (for the dumps), and rank 0's CPU matmul forms."""
        return {"comm_forms": tuple((r, c.form) for r, c in self.forms.items()),
                "comm_cost": self.comm_cost, "matmul_forms": self.matmul_forms}

    def log_comm_to(self, dump_root: str) -> None:
        """Time every collective started here from now on, into the dump at ``dump_root``
        (runtime/comm/log.py); the backend calls it when a dump is on."""
        if self.comm_log is None:
            self.comm_log = self.step_gathers.log = CommLog.under(dump_root, self.plan.rank,
                                                                  self.comm_cost)

    def describe_forms(self) -> str:
        """The dump's lines on how this runtime's buckets and shards move."""
        if not self.forms:
            return ""
        return "\ncollective forms (data-parallel group):\n" + "".join(
            f"  {'stage-3 bucket ' if k == 'param_gather' else ''}{c.describe()}\n"
            for k, c in self.forms.items())

    @property
    def tp_group_name(self) -> str | None:
        return self.tp_group.group_name if self.tp_group is not None else None

    @property
    def reduces_into_shard(self) -> bool:
        """Stage 2: each bucket is reduce-scattered straight into this rank's shard."""
        return self.plan.sharded and self.plan.bucket_collective == "reduce_scatter"

    @property
    def is_boundary(self) -> bool:
        """Whether the backward now running ends an accumulation window."""
        return (self.micro_steps + 1) % self.gas == 0

    # ---- backward: gradients from graphs (zerofx::reduce_bucket) and eager hooks ----------
    def param_name(self, tensor) -> str | None:
        """The plan's name of a trained parameter, by identity (aliases share one name)."""
        return self._names_by_id.get(id(tensor))

    def slot_of(self, tensor: torch.Tensor) -> int:
        """The plan index of the trained parameter whose storage ``tensor`` is (-1: none).
        Parameters are views of flat_params (TP ones: their stand-ins), so the address
        identifies them in any graph call, whatever object carries it."""
        if tensor.numel() == 0:
            return self._slot_by_id.get(id(tensor), -1)
        return self._slot_by_ptr.get(tensor.data_ptr(), -1)

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

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the fp16 loss scale (``loss`` itself otherwise), to call
        ``.backward()`` on: torch.amp.GradScaler's spelling of ``rt.backward(loss)``."""
        if not self.config.fp16.enabled:
            return loss
        self._loss_scaled = True
        return loss * self.scaler.scale.to(device=loss.device, dtype=loss.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with fp16 loss scaling applied at the loss, as DeepSpeed does.

        The scale multiplies the loss itself (a device tensor, no host read), so gradients
        are scaled exactly once however many graphs the model breaks into.
        """
        self.scale(loss).backward()

    def wait_buckets(self) -> None:
        t0 = time.perf_counter()
        self.intake.wait()
        self.comm_wait_s += time.perf_counter() - t0  # what backward did not hide

    def _hook_eager_grads(self, named) -> None:
        """Gradients autograd accumulates into ``p.grad`` (a parameter used outside any
        compiled graph) go to the buckets too, and ``p.grad`` stays None."""
        intake = weakref.ref(self.intake)

        def hook(p):
            it = intake()
            if it is None or p.grad is None:
                return
            i = it.rt._slot_by_id[id(p)]
            slot = it.rt.plan.params[i]
            if slot.tp is not None:
                raise ConfigError(f"tensor-parallel parameter {slot.name} got a gradient "
                                  f"outside the compiled graphs (it ran eagerly); zerofx "
                                  f"splits weights only inside compiled graphs")
            if it.rt.plan.partitioned and not slot.persistent:
                raise ConfigError(f"ZeRO-3 parameter {slot.name} was read outside the "
                                  f"compiled graphs (it ran eagerly, on a stand-in, not its "
                                  f"value): zerofx gathers partitioned weights only inside "
                                  f"compiled graphs; remove the graph break around its use "
                                  f"or raise stage3_param_persistence_threshold above its "
                                  f"size ({slot.numel})")
            it.take_eager(i, p.grad)
            p.grad = None

        for _, p in named:
            self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> bool:
        """Count a micro-step; at the accumulation boundary run the optimizer step.

        Returns whether an update was attempted (it may still be skipped on overflow).
        """
        boundary = self.is_boundary
        self._check_loss_scaled()
        self.micro_steps += 1
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
        self._scale_before.copy_(self.scaler.scale)
        if self.gatherer is not None:
            self.gatherer.drain()  # no gather may read the shard the step rewrites
        self._step_program(*self.step_inputs().tensors())
        self.intake.end_micro_step(boundary=True)
        if self.comm_log is not None:
            self.comm_log.step_done()
        return True

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
        if int(self.scaler.floor_hits):  # every rank: the same device state everywhere
            self.scaler.floor_hits.zero_()
            raise LossScaleError(
                f"fp16 loss scale is at its minimum (min_loss_scale {self.scaler.min_scale:g}) "
                f"and the gradients still overflow (step {step_no} skipped, parameters "
                f"untouched): DeepSpeed stops here too. Lower the learning rate, fix the "
                f"inf/NaN in the model or data, lower min_loss_scale, or use bf16")
        if self.plan.rank != 0:
            return
        skipped = int(self.skipped)
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
        self.lr.fill_(lr)

    def set_beta1(self, beta1: float) -> None:
        """The next step's Adam beta1 (OneCycle's momentum cycle)."""
        self.beta1.fill_(beta1)

    def restore_counters(self, *, step_count, lr, skipped, scaler: dict, micro_steps: int,
                         saved_gas: int) -> None:
        """Step counters from a checkpoint: the same number of optimizer steps when the
        accumulation count changed with the data-parallel size."""
        self.step_count.copy_(step_count)
        self.lr.copy_(lr)
        self.skipped.copy_(skipped)
        self.scaler.load_state_dict(scaler)
        self.micro_steps = micro_steps // saved_gas * self.gas
        self.mark_skips_reported()  # the loaded skips are old news

    def step_inputs(self) -> StepState:
        """The tensors the optimizer-step graph reads and updates, by name."""
        s = self.scaler
        full = self.full_grads if self.full_grads is not None else self.shard_grads
        return StepState(
            shard_grads=self.shard_grads, full_grads=full, master=self.master,
            exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq, shard_lowp=self.shard_lowp,
            flat_params=self.flat_params, lr=self.lr, step=self.step_count, scale=s.scale,
            hysteresis=s.hysteresis, it=s.iter, last_overflow=s.last_overflow_iter,
            skipped=self.skipped, beta1=self.beta1, floor_hits=s.floor_hits,
            grad_norm=self.grad_norm)

    @property
    def update_steps(self) -> int:
        """Optimizer steps attempted (accumulation boundaries reached)."""
        return self.micro_steps // self.gas

    def mark_skips_reported(self) -> None:
        """Treat every skip counted so far as logged (e.g. skips restored from a checkpoint)."""
        self._skips_reported = int(self.skipped)

    def flush_report(self) -> None:
        """Log a skip of the last step now (e.g. at the end of training)."""
        self._report_skip(self.update_steps)

    def state_bytes(self) -> int:
        """Bytes of training state this rank holds: parameters, gradients, optimizer state."""
        tensors = (self.flat_params, self.master, self.exp_avg, self.exp_avg_sq,
                   self.shard_lowp, self.shard_grads, self.full_grads)
        unique = {t.data_ptr(): t for t in tensors if t is not None}
        return sum(t.numel() * t.element_size() for t in unique.values())

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.scale)

    @property
    def skipped_steps(self) -> int:
        return int(self.skipped)


class LossScaleError(RuntimeError):
    """Overflow with the dynamic loss scale already at min_loss_scale."""


def _aliases(model: nn.Module, names_by_id: dict) -> dict[str, tuple[str, ...]]:
    """{plan name: the other names model.state_dict() uses for the same tensor} (tied
    embeddings, BERT's decoder bias): one parameter in the layout, every name on save."""
    out: dict[str, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        canon = names_by_id.get(id(p))
        if canon is not None and n != canon:
            out.setdefault(canon, []).append(n)
    return {k: tuple(v) for k, v in out.items()}


def _warn_unused_pins(config, forms) -> None:
    """A pinned form no collective here takes is said once, not silently dropped."""
    for role, why in (("reduce", "only ZeRO-2 and 3 reduce buckets into shards (stages 0-1 "
                                 "all-reduce the whole gradient buffer)"),
                      ("gather", "only ZeRO 1-3 gather shards")):
        pin = getattr(config.zerofx, f"{role}_form")
        if pin != "fastest" and not any(c.role == role for c in forms.values()):
            log.warning("zerofx.%s_form %r has no effect here: %s, over more than one "
                        "data-parallel rank", role, pin, why)


def _accumulation_steps(config: Config, dp_size: int) -> int:
    if config.train_batch_size is None and config.train_micro_batch_size_per_gpu is None:
        return config.gradient_accumulation_steps or 1
    return config.batch_sizes(dp_size).gradient_accumulation_steps


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
