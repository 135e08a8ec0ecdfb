"""The engine's DeepSpeed compatibility, in two mixins of ``ZeroEngine`` (engine.py keeps
the training loop):

    with engine.no_sync(): ...                        AccumulationControls: DeepSpeed's
    engine.set_gradient_accumulation_boundary(True)   no_sync and explicit boundaries
    engine.mp_world_size, engine.get_mom()            DeepSpeedReaders: config readers,
                                                      ranks, the model's state dict

DeepSpeedReaders also keeps DeepSpeed's attribute rule (an unknown name is looked up on the
model), with one clear AttributeError for the DeepSpeedEngine features zerofx does not have.
"""
from __future__ import annotations

import contextlib
import weakref

from zerofx.config import ConfigError

# runtime id -> its engine, for deepspeed.utils' helpers that need the engine's view of the
# accumulation window (weak: a dropped engine is freed, graph_ops' rule for runtimes)
_ENGINES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def remember(engine) -> None:
    _ENGINES[engine.runtime.id] = engine


def engine_of(runtime):
    """The live engine driving ``runtime`` (None: plain torch.compile, or none left)."""
    return _ENGINES.get(runtime.id)

# DeepSpeedEngine attributes zerofx does not have: name -> why, and what to do instead.
UNSUPPORTED = {
    "offload_states": "offloading training state to the host is not part of zerofx (on a "
                      "CPU-only run it lives in host memory already)",
    "reload_states": "offloading training state to the host is not part of zerofx",
    "set_train_batch_size": "zerofx fixes the batch sizes at initialize (the step graph and "
                            "its 1/accumulation factor are built for them): start a new "
                            "engine with the new config",
    "set_train_micro_batch_size": "zerofx fixes the batch sizes at initialize: start a new "
                                  "engine with the new config",
    "coalesce_grad_reduction": "zerofx already reduces once per accumulation window, at its "
                               "boundary: call backward per micro-batch and step() after each",
    "get_sequence_parallel_group": "sequence parallelism is not part of zerofx",
    "expert_parallel_group": "Mixture-of-Experts layers are not part of zerofx",
    "load_moe_state_dict": "Mixture-of-Experts layers are not part of zerofx",
    "flops_profiler": "the flops profiler is not part of zerofx (torch.profiler works on "
                      "the compiled model)",
    "timers": "DeepSpeed's timers are not part of zerofx: wall_clock_breakdown prints "
              "forward/backward/step times every steps_per_print steps",
    "tput_timer": "DeepSpeed's throughput timer is not part of zerofx: the engine prints "
                  "samples/s every steps_per_print steps",
    "get_wall_clock_timers": "DeepSpeed's timers are not part of zerofx: wall_clock_breakdown "
                             "prints forward/backward/step times",
    "curriculum_scheduler": "curriculum learning is not part of zerofx",
    "random_ltd_scheduler": "random layer-token drop is not part of zerofx",
    "progressive_layer_drop": "progressive layer drop is not part of zerofx",
    "get_pld_theta": "progressive layer drop is not part of zerofx",
    "compression_scheduler": "compression training is not part of zerofx",
    "get_autotp_backend": "zerofx is the compiler: tensor parallelism comes from "
                          "tensor_parallel.size (or autotp_size)",
    "register_compile_pass": "zerofx's passes are its own (zerofx.disable_passes turns them "
                             "off by name); DeepCompile passes do not run here",
}


class AccumulationControls:
    """DeepSpeedEngine's accumulation controls over the runtime's boundary: the engine
    holds DeepSpeed's view (the explicit boundary, whether no_sync is open); the runtime's
    ``boundary`` is what the gradient intake and the step obey (False inside no_sync)."""

    _boundary: bool | None = None  # set_gradient_accumulation_boundary's value
    _in_no_sync = False

    def is_gradient_accumulation_boundary(self) -> bool:
        """DeepSpeed's: whether the micro-step now running ends the accumulation window
        (its gradients are reduced and step() updates): the value given to
        set_gradient_accumulation_boundary, else every gradient_accumulation_steps-th."""
        if self._boundary is not None:
            return self._boundary
        return (self.runtime.micro_steps + 1) % self.runtime.gas == 0

    def set_gradient_accumulation_boundary(self, is_boundary) -> None:
        """DeepSpeed's: fix the answer of is_gradient_accumulation_boundary for the
        micro-steps until the next call (None: back to every gradient_accumulation_steps-th).
        A window then ends at the step() after a backward with the boundary set, however
        many micro-steps it held; gradients are still divided by gradient_accumulation_steps
        (DeepSpeed's 1/gas at the loss), so a window of another length sums, as there."""
        if not (is_boundary is None or isinstance(is_boundary, int) and is_boundary in (0, 1)):
            raise ConfigError(f"set_gradient_accumulation_boundary({is_boundary!r}): pass "
                              f"True, False or None")
        self._boundary = None if is_boundary is None else bool(is_boundary)
        if not self._in_no_sync:
            self.runtime.boundary = self._boundary

    @contextlib.contextmanager
    def no_sync(self):
        """DeepSpeed's: the backward passes inside accumulate gradients locally, without
        reducing them across ranks; a backward after the block (at a boundary) reduces the
        sum. step() inside is refused, and so is the block at ZeRO stage 2 or 3, whose
        gradient partitioning reduces as gradients arrive, and re-entry (DeepSpeed's rules)."""
        stage = self.zero_optimization_stage()
        if self.zero_optimization_partition_gradients():
            raise ConfigError(
                f"engine.no_sync() at ZeRO stage {stage}: it is incompatible with gradient "
                f"partitioning (DeepSpeed refuses it at stages 2 and 3 too). Use stage 0 or "
                f"1, or accumulate with gradient_accumulation_steps (or "
                f"set_gradient_accumulation_boundary), which reduce once per window")
        if self._in_no_sync:
            raise ConfigError("engine.no_sync() entered again inside engine.no_sync(): "
                              "re-entry is not supported (as in DeepSpeed)")
        self._in_no_sync = True
        self.runtime.boundary = False  # nothing reduces inside
        try:
            yield
        finally:
            self._in_no_sync = False
            self.runtime.boundary = self._boundary


class DeepSpeedReaders:
    """DeepSpeedEngine's readers over the engine's config, runtime and model (module doc)."""

    # ---- config readers (DeepSpeedEngine's names and meanings) ----------------------------
    def train_micro_batch_size_per_gpu(self) -> int:
        return self._batch_sizes().train_micro_batch_size_per_gpu

    def train_batch_size(self) -> int:
        return self._batch_sizes().train_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.runtime.gas

    def get_batch_info(self) -> tuple[int, int, int]:
        """DeepSpeed's (train_batch_size, train_micro_batch_size_per_gpu,
        gradient_accumulation_steps)."""
        return (self.train_batch_size(), self.train_micro_batch_size_per_gpu(),
                self.gradient_accumulation_steps())

    def _batch_sizes(self):
        cfg = self.config
        if cfg.train_batch_size is None and cfg.train_micro_batch_size_per_gpu is None:
            raise ConfigError("set train_batch_size or train_micro_batch_size_per_gpu in the "
                              "config: the engine needs a batch size for this")
        return cfg.batch_sizes(self.runtime.plan.grid.dp_size)

    def zero_optimization_stage(self) -> int:
        return self.config.zero_optimization.stage

    def zero_optimization(self) -> bool:
        return self.config.zero_optimization.stage > 0

    def zero_optimization_partition_gradients(self) -> bool:
        """DeepSpeed's: stage 2 or 3 (gradients reduced into each rank's partition)."""
        return self.config.zero_optimization.stage >= 2

    def zero_optimization_partition_weights(self) -> bool:
        return self.config.zero_optimization.stage >= 3

    def fp16_enabled(self) -> bool:
        return self.config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self.config.bf16.enabled

    def gradient_clipping(self) -> float:
        return self.config.clip_norm

    def steps_per_print(self) -> int:
        return self.config.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        return self.config.wall_clock_breakdown

    def dataloader_drop_last(self) -> bool:
        return self.config.dataloader_drop_last

    def optimizer_name(self) -> str | None:
        """The config's optimizer type (None when the script passed its own optimizer)."""
        return self.config.optimizer.type if self.config.optimizer is not None else None

    def scheduler_name(self) -> str | None:
        return self.config.scheduler.type if self.config.scheduler is not None else None

    def get_mom(self) -> list:
        """DeepSpeed's: each group's ``betas`` (``momentum`` for SGD/RMSprop)."""
        key = "momentum" if "momentum" in self.optimizer.param_groups[0] and \
            "betas" not in self.optimizer.param_groups[0] else "betas"
        return [group.get(key) for group in self.optimizer.param_groups]

    # Features zerofx refuses in the config when switched on: off whenever an engine exists.
    def curriculum_learning_enabled(self) -> bool:
        return False

    def data_efficiency_enabled(self) -> bool:
        return False

    def random_ltd_enabled(self) -> bool:
        return False

    def flops_profiler_enabled(self) -> bool:
        return False  # the config block is accepted without effect (logged at start-up)

    def autotuning_enabled(self) -> bool:
        return False  # likewise

    # ---- the parallel layout --------------------------------------------------------------
    @property
    def mp_world_size(self) -> int:
        """Model (tensor) parallel size: zerofx's tensor_parallel.size, or the mpu's."""
        return self.runtime.plan.grid.tp_size

    @property
    def data_parallel_group(self):
        """The data-parallel process group (None on one rank, as there is nothing to join)."""
        return self.runtime.comm.group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_model_parallel_rank(self) -> int:
        return self.runtime.plan.grid.tp_rank(self.global_rank)

    def get_tensor_parallel_rank(self) -> int:
        return self.get_model_parallel_rank()

    @property
    def micro_steps(self) -> int:
        """DeepSpeed's engine.micro_steps: step() calls made (restored by load_checkpoint)."""
        return self._micro_steps

    # DeepSpeedEngine attributes scripts branch on; zerofx has neither feature
    has_moe_layers = False
    sequence_parallel_size = 1

    @property
    def is_compiled(self) -> bool:
        """DeepSpeed's: the model runs compiled (with zerofx, always)."""
        return True

    def empty_partition_cache(self) -> None:
        """DeepSpeed's: free gathered stage-3 weights kept between uses. zerofx keeps none
        (a partitioned weight is whole only inside the graph that reads it)."""

    # ---- the model's weights --------------------------------------------------------------
    def module_state_dict(self, destination=None, prefix="", keep_vars=False,
                          exclude_frozen_parameters=False):
        """DeepSpeed's: the model's ``state_dict`` (without frozen parameters if asked). At
        ZeRO stage 3 the weights live as shards: refused, as a state dict of empty tensors
        would be silently useless."""
        self._refuse_partitioned("module_state_dict()")
        sd = self.module.state_dict(destination=destination, prefix=prefix,
                                    keep_vars=keep_vars)
        if exclude_frozen_parameters:
            for name, p in self.module.named_parameters():
                if not p.requires_grad:
                    sd.pop(prefix + name, None)
        return sd

    def state_dict(self, *args, **kwargs):
        """nn.Module's (keys ``module.*``, as DeepSpeedEngine's); refused at stage 3."""
        self._refuse_partitioned("state_dict()")
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        raise ConfigError(_LOAD_WEIGHTS.format(call="engine.load_state_dict"))

    def load_module_state_dict(self, checkpoint, strict=True, custom_load_fn=None,
                               fetch_z3_params=False, z3_params_to_fetch=None,
                               allowed_missing_keys=None):
        raise ConfigError(_LOAD_WEIGHTS.format(call="engine.load_module_state_dict"))

    def _refuse_partitioned(self, call: str) -> None:
        if self.runtime.plan.partitioned:
            raise ConfigError(
                f"engine.{call} at ZeRO stage 3: the weights live as shards (each rank's "
                f"parameters are empty tensors). Use engine.save_16bit_model(dir) (with "
                f"stage3_gather_16bit_weights_on_model_save), "
                f"deepspeed.zero.GatheredParameters on every rank, or save_checkpoint and "
                f"zerofx-consolidate")

    # ---- DeepSpeed's attribute rule -------------------------------------------------------
    def __getattr__(self, name: str):
        """nn.Module's lookup, then the model's attribute (DeepSpeedEngine passes unknown
        names through to its module), then a clear error for DeepSpeed features zerofx
        does not have."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        module = self.__dict__.get("_modules", {}).get("module")
        if module is not None and not name.startswith("__"):
            try:
                return getattr(module, name)
            except AttributeError:
                pass
        if name in UNSUPPORTED:
            raise AttributeError(f"engine.{name} (DeepSpeed): {UNSUPPORTED[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r} "
                             f"(nor has its module)")


def check_load_options(*, load_module_strict, load_optimizer_states, load_module_only,
                       custom_load_fn) -> None:
    """DeepSpeed's load_checkpoint options zerofx does not apply: one error each, before
    anything is read (a checkpoint restores weights, optimizer state and counters as one)."""
    if not load_module_strict:
        raise ConfigError("load_checkpoint(load_module_strict=False): zerofx restores every "
                          "trained parameter by name and refuses a checkpoint that lacks "
                          "one; for a partial load use get_fp32_state_dict_from_zero_"
                          "checkpoint and model.load_state_dict(strict=False) before "
                          "initialize")
    if not load_optimizer_states or load_module_only:
        raise ConfigError("load_checkpoint(load_optimizer_states=False / load_module_only="
                          "True): zerofx restores weights and optimizer state together; to "
                          "start a fresh optimizer from saved weights, load them with "
                          "deepspeed.utils.zero_to_fp32.load_state_dict_from_zero_checkpoint "
                          "before zerofx.initialize")
    if custom_load_fn is not None:
        raise ConfigError("load_checkpoint(custom_load_fn=...): not supported by zerofx")


_LOAD_WEIGHTS = (
    "{call}: writing weights into a running engine would bypass zerofx's fp32 master copy "
    "(the next step would overwrite them from it) and its shards. Load them into the model "
    "before zerofx.initialize, or restore with engine.load_checkpoint")

