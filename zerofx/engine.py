"""The DeepSpeed-compatible training API: ``zerofx.initialize`` and the engine it returns.

    engine, optimizer, loader, scheduler = zerofx.initialize(model=model, config="ds.json")
    for batch in loader:
        loss = engine(*batch)
        engine.backward(loss)
        engine.step()

A thin layer over the ``zero`` backend: the engine builds a ZeroRuntime, compiles the model
with ``torch.compile(backend="zero", options={"runtime": ...})`` and adds what a training
loop wants around it: LR schedules, a distributed loader, logging, checkpoints.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time

import torch
from torch import nn

from zerofx import param_groups
from zerofx.backend import dump_root_of, offer_step_program
from zerofx.config import Config, ConfigError
from zerofx.data import DistributedLoader
from zerofx.dynamo_settings import skip_once_logging, traced_checkpoint_side_effects
from zerofx.engine_compat import (AccumulationControls, DeepSpeedReaders,
                                  check_load_options, remember)
from zerofx.monitor import Monitor
from zerofx.optimizer import ZeroOptimizer
from zerofx.passes import build_pipeline
from zerofx.runtime.comm.dist import init_distributed
from zerofx.runtime.tp_inputs import check_same_inputs
from zerofx.runtime.tp_whole import whole_state
from zerofx.runtime.zero import ZeroRuntime

log = logging.getLogger(__name__)
SCHEDULER_KEY = "zerofx_lr_scheduler"  # the engine's own entry in a checkpoint's client_state


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's flags, as its ``add_config_arguments`` adds them (group "DeepSpeed":
    --deepspeed, --deepspeed_config, the deprecated --deepscale / --deepscale_config), plus
    zerofx's --zerofx_config alias. Like DeepSpeed's, no --local_rank: scripts that read it
    define it themselves (zerofx-launch and torchrun set LOCAL_RANK in the environment), and
    adding it here made their own definition a conflict."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (helper flag for user code; zerofx is always on)")
    group.add_argument("--deepspeed_config", default=None, type=str,
                       help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="Deprecated enable DeepSpeed (helper flag for user code)")
    group.add_argument("--deepscale_config", default=None, type=str,
                       help="Deprecated DeepSpeed json configuration file.")
    group.add_argument("--zerofx_config", default=None, type=str,
                       help="alias of --deepspeed_config")
    return parser


def initialize(args=None, model: nn.Module | None = None, model_parameters=None,
               optimizer=None, lr_scheduler=None, training_data=None, config=None,
               config_params=None, collate_fn=None, mpu=None, example_inputs=None):
    """Build the engine: ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    ``mpu``: a model that does its own tensor (model) parallelism passes Megatron's mpu
    object, as with DeepSpeed; ZeRO then shards over its data-parallel group.
    ``example_inputs`` (zerofx's own; a dict of keyword arguments or a tuple): with
    ``tensor_parallel.size > 1`` and no plan, the model runs once on them and the layout is
    read from that graph (a Hugging Face model's ``dummy_inputs`` serve otherwise).
    """
    if model is None:
        raise ConfigError("zerofx.initialize needs model=<your nn.Module>")
    cfg = Config.from_any(_config_source(args, config, config_params))
    # which parameters train, and under which optimizer (param_groups.py: DeepSpeed's rule,
    # every check made before the model is touched)
    chosen = param_groups.select(model, model_parameters, optimizer, cfg,
                                 user_scheduler=lr_scheduler is not None)
    with param_groups.trained_only(model, chosen.trained):  # a failure restores the flags
        engine = ZeroEngine(model, cfg, optimizer=chosen.optimizer,
                            lr_scheduler=lr_scheduler, training_data=training_data,
                            collate_fn=collate_fn, mpu=mpu, example_inputs=example_inputs)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _config_source(args, config, config_params):
    given = [c for c in (config, config_params) if c is not None]
    from_args = None
    if args is not None:
        # DeepSpeed reads the deprecated --deepscale_config when --deepspeed_config is unset
        from_args = getattr(args, "deepspeed_config", None) or getattr(
            args, "deepscale_config", None) or getattr(args, "zerofx_config", None)
    if from_args is not None:
        given.append(from_args)
    if len(given) > 1:
        raise ConfigError("the config was given more than once (config=, config_params= or "
                          "--deepspeed_config): pass exactly one")
    return given[0] if given else None


# Forward calls whose inputs are compared across the tensor-parallel group (each costs a
# checksum of the inputs and one tiny all-reduce): a data-sharding mistake shows at once.
INPUT_CHECKS = 3


class ZeroEngine(AccumulationControls, DeepSpeedReaders, nn.Module):
    """What ``zerofx.initialize`` returns: call it, ``backward``, ``step``, checkpoint it.
    DeepSpeed's accumulation controls (no_sync, set_gradient_accumulation_boundary) and
    readers (config, ranks, the model's state dict) are in engine_compat.py."""

    def __init__(self, model: nn.Module, config: Config, *, optimizer=None, lr_scheduler=None,
                 training_data=None, collate_fn=None, mpu=None, example_inputs=None):
        super().__init__()
        world = init_distributed()
        # DeepSpeed's names (its _set_distributed_vars): scripts write
        # `if engine.global_rank == 0` and `.to(engine.device)`
        self.global_rank, self.local_rank = world.rank, world.local_rank
        self.world_size = world.world_size
        self.config = config
        if torch.cuda.is_available():  # DeepSpeed's engine moves the module to its device
            model.to(torch.device("cuda", torch.cuda.current_device()))
        self.module = model
        self.runtime = ZeroRuntime(model, config, optimizer=optimizer, mpu=mpu,
                                   example_inputs=example_inputs)
        skip_once_logging()  # transformers may have come after zerofx.backend's import
        # Not a submodule: the engine's state_dict is the model's once ("module.*"), as
        # DeepSpeedEngine's, not again under the compiled wrapper's "_orig_mod".
        object.__setattr__(self, "compiled", torch.compile(
            model, backend="zero", options={"runtime": self.runtime},
            fullgraph=config.zerofx.fullgraph, dynamic=config.zerofx.dynamic))
        # A model Dynamo compiles nothing of (an nn.LSTM makes it skip every frame) offers no
        # step graph from the backend; its gradients come through the eager hooks.
        offer_step_program(self.runtime, build_pipeline(config, with_runtime=True),
                           dump_root=dump_root_of(config), graph_id="eager", fallback=True)
        # DeepSpeed hands back its ZeRO optimizer wrapper; this one has the groups torch's
        # LR schedulers and scripts read, and its lr feeds the step (zerofx/optimizer.py).
        self.optimizer = ZeroOptimizer(self.runtime, _trained(model), client=optimizer)
        if callable(lr_scheduler):  # DeepSpeed's: a factory given the engine's optimizer
            lr_scheduler = lr_scheduler(self.optimizer)
        if lr_scheduler is not None:  # the user's scheduler drives the lr, not the config's
            self.runtime.drop_schedule()
        # the config's schedule is the runtime's (stepped after each applied step)
        self.lr_scheduler = lr_scheduler or self.runtime.schedule
        self._set_lr()
        dp = self.runtime.plan.grid
        self.dp_world_size = dp.dp_size
        self.dp_rank = dp.dp_rank(world.rank)  # which share of the data this rank trains on
        self._inputs_checked = 0
        self._micro_steps = 0  # step() calls (DeepSpeed's micro_steps)
        self._window_open = False  # micro-steps since the last update (their gradients wait)
        self.gradients_reduced = False  # a boundary's backward ran; its step has not
        self._skipped_before = None  # the skip count before the last optimizer step
        self.device = self.runtime.device
        self.training_dataloader = None
        if training_data is not None:
            self.training_dataloader = DistributedLoader(
                training_data, batch_size=self.train_micro_batch_size_per_gpu(),
                dp_rank=dp.dp_rank(world.rank), dp_size=dp.dp_size, collate_fn=collate_fn,
                drop_last=config.dataloader_drop_last)
        self._timers = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        self._last_loss = None
        self.monitor = Monitor(config, rank=world.rank)
        self._window_losses: list[torch.Tensor] = []  # this optimizer step's micro losses
        self.global_samples = 0
        self._window_start, self._window_samples = time.perf_counter(), 0
        remember(self)

    # ---- the training loop ---------------------------------------------------------------
    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        if self._inputs_checked < INPUT_CHECKS:  # the tensor-parallel ranks' batches agree
            check_same_inputs(self.runtime, args, kwargs)
            self._inputs_checked += 1
        if self.config.fp16.enabled and self.config.fp16.auto_cast:
            args, kwargs = _half_inputs(args), _half_inputs(kwargs)
        try:
            with self.runtime.shape_carriers(), traced_checkpoint_side_effects():
                out = self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            # A bad plan or config found while compiling: the user needs zerofx's message,
            # not Dynamo's wrapper and its traceback.
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, ConfigError):
                raise inner from None
            raise
        self._timers["forward"] += time.perf_counter() - t0
        return out

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backpropagate ``loss``, scaled by the fp16 loss scale (1/accumulation happens in
        the step)."""
        t0 = time.perf_counter()
        self.runtime.backward(loss)
        self.gradients_reduced = self.runtime.is_boundary  # (no_sync: False)
        self._timers["backward"] += time.perf_counter() - t0
        self._last_loss = loss.detach()
        if self.monitor.enabled:
            self._window_losses.append(self._last_loss)
        return loss

    def step(self) -> None:
        """Count a micro-step; at the accumulation boundary update, schedule and log."""
        if self._in_no_sync:
            raise ConfigError("engine.step() inside engine.no_sync(): the gradients inside "
                              "are not reduced yet (DeepSpeed refuses it too); call step() "
                              "after the block, following a backward outside it")
        t0 = time.perf_counter()
        self._window_samples += self.train_micro_batch_size_per_gpu() * \
            self.runtime.plan.grid.dp_size
        # the skip count before the update, on the device: read only if was_step_applied is
        boundary = self.runtime.is_boundary
        skipped = self.runtime.state.skipped.clone() if boundary else None
        lr_used = self.optimizer.param_groups[0]["lr"]  # the step may move it (schedules)
        # at the boundary through the optimizer: its group's lr is the step's, and a torch
        # LR scheduler on it sees its step called
        updated = self.optimizer.step() if boundary else self.runtime.step()
        self._timers["step"] += time.perf_counter() - t0
        self._micro_steps += 1
        self._window_open, self.gradients_reduced = not updated, False
        if not updated:
            return
        self._skipped_before = skipped
        self.global_samples += self.train_batch_size()
        if self.monitor.enabled:
            self._write_monitor(lr_used)
        if self._drives_scheduler():
            if self.was_step_applied():  # DeepSpeed's: not after a skipped (overflow) step
                self.lr_scheduler.step()
            self._set_lr()
        elif self.lr_scheduler is not None:  # the runtime stepped and applied its schedule
            self.optimizer.show_lr(self.lr_scheduler.get_last_lr()[0])
        if self.global_steps % self.config.steps_per_print == 0:
            self._report()

    def _write_monitor(self, lr_used: float) -> None:
        """DeepSpeed's step events, against samples seen (the lr this step used)."""
        events = [("Train/Samples/lr", lr_used, self.global_samples)]
        if self._window_losses:
            mean = torch.stack([x.float() for x in self._window_losses]).mean()
            events.append(("Train/Samples/train_loss", float(mean), self.global_samples))
        if self.config.fp16.enabled:
            events.append(("Train/Samples/loss_scale", self.runtime.loss_scale,
                           self.global_samples))
        self._window_losses = []
        self.monitor.write_events(events)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's: the loss times the fp16 loss scale, for ``scale(loss).backward()``."""
        self.gradients_reduced = self.runtime.is_boundary  # the backward follows
        return self.runtime.scale(loss)

    def _drives_scheduler(self) -> bool:
        """A scheduler of the user's, stepped here (the config's steps in the runtime)."""
        return self.lr_scheduler is not None and self.lr_scheduler is not self.runtime.schedule

    def _set_lr(self) -> None:
        """The next step's lr into the runtime (the user's scheduler) and into the
        optimizer's group (either), where scripts read it."""
        if self.lr_scheduler is None:
            return
        if self._drives_scheduler():
            self.runtime.set_lr(self.lr_scheduler.get_last_lr()[0])
        else:
            self.runtime.apply_schedule()
        self.optimizer.show_lr(self.lr_scheduler.get_last_lr()[0])

    def destroy(self) -> None:
        """DeepSpeed's: release what the engine attached to the model (its hooks)."""
        self.runtime.close()

    # ---- what DeepSpeed users read -------------------------------------------------------
    @property
    def global_steps(self) -> int:
        return self.runtime.update_steps

    def loss_scale(self) -> float:
        """DeepSpeed's ``engine.loss_scale()``: the config's static fp16 scale, 0 when the
        scale is dynamic (the current scale is ``engine.optimizer.loss_scale``, as there)."""
        return self.config.fp16.loss_scale

    def dynamic_loss_scale(self) -> bool:
        return self.config.fp16.loss_scale == 0

    @property
    def skipped_steps(self) -> int:
        return self.runtime.skipped_steps

    def get_lr(self) -> list[float]:
        return [float(self.runtime.state.lr)]

    def get_global_grad_norm(self) -> float | None:
        """DeepSpeed's: the global 2-norm of the unscaled gradients at the last optimizer step
        (before clipping; over every rank's shard and tensor-parallel piece; inf when fp16
        overflowed), or None before the first step."""
        if self._skipped_before is None:
            return None
        norm = float(self.runtime.state.grad_norm)
        return norm if math.isfinite(norm) else math.inf  # an overflow's inf - inf is a nan

    def was_step_applied(self) -> bool:
        """DeepSpeed's: whether the last optimizer step updated the weights (False when an
        fp16 overflow skipped it, or before the first step)."""
        before = self._skipped_before
        return before is not None and bool(self.runtime.state.skipped == before)

    # ---- logging -------------------------------------------------------------------------
    def _report(self) -> None:
        if self.runtime.plan.rank != 0:
            return
        elapsed = time.perf_counter() - self._window_start
        loss = float(self._last_loss) if self._last_loss is not None else float("nan")
        line = (f"step {self.global_steps} | loss (last micro-batch) {loss:.4f} | "
                f"lr {self.get_lr()[0]:.3e} | "
                f"loss scale {self.runtime.loss_scale:g} | skipped {self.skipped_steps} | "
                f"{self._window_samples / max(elapsed, 1e-9):.1f} samples/s")
        if self.config.wall_clock_breakdown:
            line += " | " + " ".join(f"{k} {v * 1e3:.0f}ms" for k, v in self._timers.items())
            line += f" (comm wait {self.runtime.comm_wait_s * 1e3:.0f}ms)"
        log.info(line)
        print(line, flush=True)
        self._timers = dict.fromkeys(self._timers, 0.0)
        self.runtime.comm_wait_s = 0.0
        self._window_start, self._window_samples = time.perf_counter(), 0

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True,
                        exclude_frozen_parameters=False) -> str:
        """DeepSpeed's; the model's persistent buffers are saved with the training state
        (each rank's own); frozen parameters are never saved (the model keeps them), whatever
        ``exclude_frozen_parameters`` says."""
        from zerofx.checkpoint import CheckpointError, save_checkpoint

        if self._window_open and self.runtime.micro_steps % self.runtime.gas == 0:
            # an explicit boundary held the window open: its gradients would be lost
            raise CheckpointError("save_checkpoint inside an accumulation window held open by "
                                  "set_gradient_accumulation_boundary(False): save after the "
                                  "step() that ends it")
        state = dict(client_state or {})
        if SCHEDULER_KEY in state:
            raise ConfigError(f"client_state key {SCHEDULER_KEY!r} is reserved by zerofx")
        if self.lr_scheduler is not None:
            state[SCHEDULER_KEY] = self.lr_scheduler.state_dict()
        return save_checkpoint(self.runtime, save_dir, tag=tag, client_state=state,
                               save_latest=save_latest, module=self.module)

    def save_16bit_model(self, save_dir, save_filename: str = "pytorch_model.bin") -> bool:
        """DeepSpeed's ``save_16bit_model``: the model's weights in the compute dtype, whole,
        written by rank 0 (every rank calls it). At stage 3 the weights are gathered, which
        the config must allow (``stage3_gather_16bit_weights_on_model_save``); weights
        zerofx split for tensor parallelism are gathered whole too."""
        rt = self.runtime
        if rt.plan.partitioned and \
                not self.config.zero_optimization.stage3_gather_16bit_weights_on_model_save:
            raise ConfigError("save_16bit_model at ZeRO stage 3 gathers the partitioned "
                              "weights: set zero_optimization."
                              "stage3_gather_16bit_weights_on_model_save true, or save a "
                              "checkpoint and run zerofx-consolidate")
        with rt.gathered_parameters():
            state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        state = whole_state(rt, state)  # the weights zerofx split, whole again
        if rt.plan.rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            torch.save(state, os.path.join(save_dir, save_filename))
        return True

    def save_fp16_model(self, save_dir, save_filename: str = "pytorch_model.bin") -> bool:
        """DeepSpeed's older name of save_16bit_model, kept by DeepSpeed for old scripts."""
        return self.save_16bit_model(save_dir, save_filename)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True,
                        load_optimizer_states=True, load_lr_scheduler_states=True,
                        load_module_only=False, custom_load_fn=None):
        """Restore everything saved; returns ``(path, client_state)`` (None, None if absent).
        DeepSpeed's options: ``load_lr_scheduler_states=False`` keeps the current schedule;
        the others only at their defaults (check_load_options says why)."""
        from zerofx.checkpoint import load_checkpoint

        check_load_options(load_module_strict=load_module_strict,
                           load_optimizer_states=load_optimizer_states,
                           load_module_only=load_module_only, custom_load_fn=custom_load_fn)
        path, state = load_checkpoint(self.runtime, load_dir, tag=tag, module=self.module)
        if path is None:
            return None, None
        self._micro_steps, self._window_open = self.runtime.micro_steps, False
        if self.config.train_batch_size or self.config.train_micro_batch_size_per_gpu:
            self.global_samples = self.global_steps * self.train_batch_size()
        state = dict(state or {})
        sched = state.pop(SCHEDULER_KEY, None)
        if sched is not None and self.lr_scheduler is not None and load_lr_scheduler_states:
            self.lr_scheduler.load_state_dict(sched)
            self._set_lr()
        return path, state


def _trained(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _half_inputs(obj):
    """fp16.auto_cast: floating-point tensors in the inputs become float16 (DeepSpeed's
    _cast_inputs_half: containers walked, integer tensors untouched)."""
    if isinstance(obj, torch.Tensor):
        return obj.half() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_half_inputs(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _half_inputs(v) for k, v in obj.items()}
    return obj


# DeepSpeed's class name (deepspeed.runtime.engine.DeepSpeedEngine: isinstance checks in scripts)
DeepSpeedEngine = ZeroEngine
