"""Typed zerofx configuration and the reader for DeepSpeed's JSON config format.

With config/scheduler.py (the "scheduler" block), the only module that knows raw JSON key
strings (docs/design.md, conventions): everything downstream reads the frozen dataclasses
below. Attribute names mirror DeepSpeed's JSON keys so a DeepSpeed user
recognises them, and the defaults are DeepSpeed's.

    cfg = Config.from_any("ds_config.json")          # or a dict, a Config, or None
    cfg.zero_optimization.stage, cfg.compute_dtype, cfg.batch_sizes(dp_world_size=4)

Every check lives in a field's `check` (run by `__post_init__`), so a config built with keywords
is validated exactly like one read from JSON. Any bad input raises ConfigError, whose message
names the key path, the value given and what is allowed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

from zerofx.config.schema import (
    ConfigError, Invalid, bad, boolean, check_keys, checked, choice, default_of, dump, instance,
    integer, is_int, json_object, key_error, load_json, names, nested_setting, number, optional,
    parse_block, parse_in, path_string, required_setting, setting, show, validate, zero_or,
)
from zerofx.config.scheduler import (  # noqa: F401  (re-exported by zerofx.config)
    MAX_LR, LRRangeTestParams, OneCycleParams, SchedulerConfig, WarmupDecayLRParams,
    WarmupLRParams, parse_scheduler,
)

__all__ = [
    "BF16Config", "BatchSizes", "Config", "ConfigError", "FP16Config", "LRRangeTestParams",
    "OneCycleParams", "OptimizerConfig", "SchedulerConfig", "TensorParallelConfig",
    "WarmupDecayLRParams", "WarmupLRParams", "ZeroConfig", "ZerofxConfig",
]


def _betas(v: Any) -> tuple[float, float]:
    allowed = "a list of two numbers in [0, 1)"
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise Invalid(allowed)
    try:
        return tuple(number(0.0, 1.0, hi_open=True)(b) for b in v)
    except Invalid:
        raise Invalid(allowed) from None


_TP_STYLES = choice("colwise", "rowwise")


def _tp_plan(v: Any) -> tuple[tuple[str, str], ...]:
    """{"pattern": "colwise"|"rowwise"} (JSON) or ((pattern, style), ...) -> ordered pairs."""
    allowed = 'an object mapping glob patterns to "colwise" or "rowwise"'
    if isinstance(v, Mapping):
        pairs = list(v.items())
    elif isinstance(v, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                              for p in v):
        pairs = [tuple(p) for p in v]
    else:
        raise Invalid(allowed)
    patterns = [p for p, _ in pairs]
    if not all(isinstance(p, str) and p for p in patterns) or len(set(patterns)) < len(pairs):
        raise Invalid(allowed + " (non-empty, distinct patterns)")
    try:
        return tuple((p, _TP_STYLES(s)) for p, s in pairs)
    except Invalid:
        raise Invalid(allowed) from None


# Bounds where a number enters (issue: a huge lr gives NaN parameters, a scale beyond
# float32 is inf). 2**127 is the largest power of two a float32 holds.
MAX_SCALE = 2.0 ** 127
MIN_STATIC_SCALE = 2.0 ** -24
INT64_MAX = 2**63 - 1
# The loss scaler's counters live in int64 tensors: 2**70 loaded and then overflowed there,
# a raw error at the first step.
_COUNTER = integer(1, INT64_MAX, ceiling="at most 2**63 - 1: the loss scaler counts in int64")

# gradient_predivide_factor: gradients are multiplied by 1/factor before the reduction and
# the step divides by dp x accumulation / factor. 1e300 made 1/factor 0 in float32 and every
# parameter NaN. DeepSpeed sets it between 1 and the data-parallel size.
_PREDIVIDE = number(1e-6, 1e6, why="gradients are multiplied by 1/factor before their "
                                   "reduction; beyond these float32 underflows or overflows")
# A gradient norm to clip to (gradient_clipping, LAMB's max_grad_norm). Below 1e-6 each
# clipped gradient element sits under Adam's eps and the updates silently stop (1e-300 is
# 0 in float32); above 2**127 the norm is not a float32.
# DeepSpeed's gradient_clipping default since 0.19.3 (GRADIENT_CLIPPING_DEFAULT)
DEEPSPEED_CLIP_DEFAULT = 1.0
_CLIP_NORM = zero_or(number(1e-6, MAX_SCALE, why="a smaller norm scales every gradient to "
                                                 "nothing and updates stop"))

# ---- the config blocks ----

@dataclass(frozen=True)
class FP16Config:
    """DeepSpeed's "fp16" block: float16 compute with fp32 master weights and loss scaling."""

    enabled: bool = setting(False, boolean)
    """Compute in float16; the optimizer keeps an fp32 master copy of the parameters."""
    loss_scale: float = setting(0.0, number(0.0, MAX_SCALE))
    """0 selects dynamic loss scaling; a positive value is a fixed (static) scale, at least
    2**-24 (smaller rounds gradients to zero in fp16) and at most 2**127 (float32)."""
    initial_scale_power: int = setting(16, integer(0, 127))
    """Dynamic scaling starts at 2**initial_scale_power (<= 127 keeps it a finite float32)."""
    loss_scale_window: int = setting(1000, _COUNTER)
    """Overflow-free steps after which the dynamic scale doubles."""
    hysteresis: int = setting(2, _COUNTER)
    """Overflows tolerated before the dynamic scale is halved (DeepSpeed's delayed shift)."""
    min_loss_scale: float = setting(1.0, number(0.0, MAX_SCALE, lo_open=True))
    """The dynamic scale never drops below this (at least 2**-24); an overflow there stops
    training."""
    consecutive_hysteresis: bool = setting(False, boolean)
    """Refill the hysteresis on every overflow-free step (else only when the scale grows)."""
    auto_cast: bool = setting(False, boolean)
    """The engine casts floating-point forward inputs to float16 (DeepSpeed's auto_cast);
    zerofx casts inside the graph either way, so this only rounds the inputs."""

    def __post_init__(self) -> None:
        validate(self)
        if 0 < self.loss_scale < MIN_STATIC_SCALE:
            raise bad("loss_scale", self.loss_scale, "0 (dynamic) or a static scale >= "
                      "2**-24 (a smaller one rounds every fp16 gradient to zero)")
        if self.min_loss_scale < MIN_STATIC_SCALE:  # the dynamic scale can fall to it
            raise bad("min_loss_scale", self.min_loss_scale, "a scale >= 2**-24 (a smaller "
                      "one rounds every fp16 gradient to zero)")


@dataclass(frozen=True)
class BF16Config:
    """DeepSpeed's "bf16" block: bfloat16 compute, fp32 master weights, no loss scaling."""

    enabled: bool = setting(False, boolean)
    """Compute in bfloat16; the optimizer keeps an fp32 master copy of the parameters."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ActivationCheckpointingConfig:
    """DeepSpeed's "activation_checkpointing" block, read by ``zerofx.checkpointing.configure``
    (what each key does here: zerofx/checkpointing.py)."""

    partition_activations: bool = setting(False, boolean)
    """Split a checkpointed region's saved input across the tensor-parallel group."""
    contiguous_memory_optimization: bool = setting(False, boolean)
    """DeepSpeed's contiguous buffers for saved inputs (no effect here)."""
    cpu_checkpointing: bool = setting(False, boolean)
    """Keep saved inputs in host memory (a CPU run keeps them there already)."""
    number_checkpoints: int | None = setting(None, optional(integer(1)))
    """Checkpointed regions per step, for the contiguous buffers (no effect here)."""
    synchronize_checkpoint_boundary: bool = setting(False, boolean)
    """Synchronise the device at region boundaries (no effect here)."""
    profile: bool = setting(False, boolean)
    """Log each checkpointed call (debug level)."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ZeroConfig:
    """DeepSpeed's "zero_optimization" block (ZeRO, Rajbhandari et al. 2020)."""

    stage: int = setting(0, integer(0, 3))
    """0: plain data parallel; 1: shard optimizer state; 2: also shard gradients; 3: also
    shard the parameters (gathered by the graphs right before use, freed after)."""
    reduce_bucket_size: int = setting(500_000_000, integer(1))
    """Elements per gradient reduction bucket."""
    allgather_bucket_size: int = setting(500_000_000, integer(1))
    """Elements per all-gather of updated parameter shards."""
    overlap_comm: bool = setting(False, boolean)
    """Accepted for DeepSpeed configs; zerofx always overlaps: a bucket's reduction starts in
    backward as soon as its last gradient arrives (false would only delay it to the end of
    backward, with the same numbers)."""
    contiguous_gradients: bool = setting(True, boolean)
    """Accepted for DeepSpeed configs; zerofx always copies each gradient into its bucket's
    contiguous buffer as it is produced (its buckets are slices of one flat buffer)."""
    reduce_scatter: bool = setting(True, boolean)
    """Reduce gradients with reduce-scatter (True) or all-reduce (False)."""
    stage3_prefetch_bucket_size: int = setting(50_000_000, integer(1))
    """Stage 3: elements per parameter gather, and how far ahead of use gathers are issued
    (the next gathers up to this many elements start while the current one computes). Also
    caps the stage-3 bucket size, since a bucket is the unit one collective gathers."""
    stage3_param_persistence_threshold: int = setting(100_000, integer(0))
    """Stage 3: parameters of at most this many elements stay whole on every rank (no
    gather), DeepSpeed's default 1e5; 0 partitions every parameter."""
    stage3_model_persistence_threshold: int = setting(2**63 - 1, integer(0))
    """Stage 3: at most this many elements are kept whole in all (DeepSpeed's rule: in
    registration order, a parameter persists only while the total stays within it)."""
    stage3_max_live_parameters: int = setting(1_000_000_000, integer(1))
    """Stage 3: gathered elements a graph may hold at once; a prefetch that would exceed it
    waits until earlier gathered parameters are freed (one group always fits)."""
    stage3_max_reuse_distance: int = setting(1_000_000_000, integer(0))
    """Accepted for DeepSpeed configs: zerofx frees a gathered parameter after its last use
    in the graph and gathers it again for backward, whatever the distance."""
    stage3_gather_16bit_weights_on_model_save: bool = setting(False, boolean)
    """Stage 3: ``engine.save_16bit_model`` gathers the whole weights (else it refuses, as
    the parameters are partitioned)."""

    def __post_init__(self) -> None:
        validate(self)



_OPTIMIZER_TYPE = choice("Adam", "AdamW", "Lamb", fold=True)
_ADAM_ONLY = ("adam_w_mode",)
_LAMB_ONLY = ("max_coeff", "min_coeff", "eps_inside_sqrt")


@dataclass(frozen=True)
class OptimizerConfig:
    """DeepSpeed's "optimizer" block, {"type": ..., "params": {...}}, flattened."""

    type: str = required_setting(_OPTIMIZER_TYPE)
    """"Adam", "AdamW" or "Lamb" (JSON spelling is case-insensitive)."""
    lr: float = setting(1e-3, number(0.0, MAX_LR))
    """Learning rate (a scheduler, if configured, overrides it each step)."""
    betas: tuple[float, float] = setting((0.9, 0.999), _betas)
    """Decay rates of the first and second moment estimates."""
    eps: float = setting(1e-8, number(1e-30, 1.0, why="at 0, or what float32 rounds to 0, "
                                                     "a zero gradient's update is 0/0 = NaN"))
    """Added to the denominator for numerical stability."""
    weight_decay: float = setting(0.0, number(0.0, 100.0, why="each step multiplies a weight by "
                                                             "1 - lr x weight_decay"))
    """Weight decay coefficient."""
    bias_correction: bool = setting(True, boolean)
    """Apply Adam's bias correction to the moment estimates."""
    adam_w_mode: bool = setting(True, boolean)
    """Adam/AdamW only: decoupled weight decay (DeepSpeed's default, required for AdamW)."""
    max_coeff: float = setting(10.0, number(1e-6, 1e6, why="a smaller cap on the trust ratio "
                                                          "stops the updates"))
    """Lamb only: upper clamp of the trust ratio."""
    min_coeff: float = setting(0.01, number(0.0, 1e6))
    """Lamb only: lower clamp of the trust ratio."""
    eps_inside_sqrt: bool = setting(False, boolean)
    """Lamb only: add eps inside the square root of the second moment."""

    def __post_init__(self) -> None:
        validate(self)
        foreign = _ADAM_ONLY if self.type == "Lamb" else _LAMB_ONLY
        for name in foreign:  # a value set for the other optimizer is a mistake, not a no-op
            if getattr(self, name) != default_of(OptimizerConfig, name):
                raise key_error(name, f" is not a parameter of optimizer type {self.type}")
        if self.type == "AdamW" and not self.adam_w_mode:
            raise bad("adam_w_mode", False, "true: AdamW always decouples weight decay")
        if self.min_coeff > self.max_coeff:
            raise bad("min_coeff", self.min_coeff, f"<= max_coeff ({self.max_coeff})")


def _job_name(v: Any) -> str:
    if not isinstance(v, str) or not v or "/" in v or v in (".", ".."):
        raise Invalid("a non-empty name without '/'")
    return v


@dataclass(frozen=True)
class MonitorConfig:
    """DeepSpeed's "csv_monitor" / "tensorboard" blocks: rank 0 writes the learning rate,
    the fp16 loss scale and the mean training loss at every optimizer step, against the
    number of samples seen, into ``<output_path>/<job_name>``."""

    enabled: bool = setting(False, boolean)
    """Write the events."""
    output_path: str = setting("", lambda v: v if isinstance(v, str) else path_string(v))
    """Directory for the job's folder ("": the working directory, as in DeepSpeed)."""
    job_name: str = setting("DeepSpeedJobName", _job_name)
    """The folder the files go into."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class WandbConfig:
    """DeepSpeed's "wandb" block: the same events as csv_monitor, logged to Weights & Biases
    on rank 0 (needs the wandb package)."""

    enabled: bool = setting(False, boolean)
    """Log the events."""
    group: str | None = setting(None, optional(_job_name))
    """The run's wandb group."""
    team: str | None = setting(None, optional(_job_name))
    """The wandb entity (team) the project belongs to."""
    project: str = setting("deepspeed", _job_name)
    """The wandb project."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class TensorParallelConfig:
    """The "tensor_parallel" block: Megatron-style sharding of matching weights."""

    size: int = setting(1, integer(1))
    """Ranks per tensor-parallel group (1: off)."""
    plan: tuple[tuple[str, str], ...] = setting((), _tp_plan, dump=dict)
    """(glob pattern over parameter/module names, "colwise"|"rowwise"), in JSON order."""
    sequence_parallel: bool = setting(False, boolean)
    """Megatron's sequence parallelism: between tensor-parallel regions (norms, dropout,
    residual adds) each rank keeps only its tokens; row-parallel outputs are
    reduce-scattered and column-parallel inputs all-gathered instead of all-reduced."""
    vocab_parallel: bool = setting(True, boolean)
    """Without a plan: split the word embedding, the LM head and the cross-entropy over the
    vocabulary too (Megatron's vocabulary-parallel layers); false keeps them whole."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ZerofxConfig:
    """The "zerofx" block: zerofx's own settings, not DeepSpeed's."""

    inductor: bool = setting(False, boolean)
    """Hand the transformed graphs to Inductor instead of running them eagerly."""
    dump_dir: str | None = setting(None, optional(path_string))
    """Write per-pass graph dumps into this directory."""
    disable_passes: tuple[str, ...] = setting((), names)
    """Names of passes to skip (checked against the pass registry by the pipeline)."""
    fullgraph: bool = setting(False, boolean)
    """The engine compiles with torch.compile(fullgraph=True): a graph break is an error
    that names it (breaks are allowed by default; each costs a graph boundary)."""
    dynamic: bool | None = setting(None, optional(boolean))
    """torch.compile's ``dynamic`` for the engine (None: Dynamo decides on recompiles)."""
    reduce_form: str = setting("fastest", choice("fastest", "reduce_scatter", "all_reduce", "p2p",
                                                 "shm"))
    """How ZeRO-2 reduces a gradient bucket into the shards (runtime/comm/forms.py): fastest
    times every form on the group once and takes the fastest (all give the same bits)."""
    gather_form: str = setting("fastest", choice("fastest", "all_gather", "p2p", "shm"))
    """How stages 1-2 all-gather the updated shards (fastest: the fastest timed)."""
    activation_memory_budget: float = setting(1.0, number(0.0, 1.0))
    """The share of the forward's activations the backward may find saved (1.0: save what
    the backward reads; below, the partitioner recomputes the cheapest ops to meet it:
    passes/pipeline.partitioner). Gradients are unchanged; the dump's partitioned/saved.txt
    lists what is saved and what is recomputed."""
    matmul_form: str = setting("host", choice("host", "native", "fp32"))
    """How CPU bf16/fp16 matmuls run (zerofx/cpu_gemm.py): host takes native GEMMs where the
    CPU has them (AVX512-BF16/FP16, AMX), fp32 with one rounding elsewhere; rank 0 decides."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class BatchSizes:
    """Resolved batch sizes: train_batch_size = micro x accumulation steps x DP world size."""

    train_batch_size: int
    """Samples per optimizer step, over all data-parallel ranks."""
    train_micro_batch_size_per_gpu: int
    """Samples per forward/backward on one rank."""
    gradient_accumulation_steps: int
    """Micro-batches accumulated per optimizer step."""


def _parse_zero(raw: Any) -> ZeroConfig:
    if isinstance(raw, bool):  # the original 2020 form: "zero_optimization": true means stage 1
        return ZeroConfig(stage=int(raw))
    if not isinstance(raw, Mapping):
        raise Invalid("a JSON object, or true/false (DeepSpeed 2020's form of stage 1/0)")
    return parse_block(ZeroConfig, raw)


def _parse_optimizer(raw: Any) -> OptimizerConfig | None:
    if raw is None:
        return None
    block = json_object(raw)
    check_keys(block, ("type", "params"), required=("type",))
    kind = checked("type", block["type"], _OPTIMIZER_TYPE)
    return parse_in("params", partial(_optimizer_params, kind), block.get("params", {}))


def _optimizer_params(kind: str, raw: Any) -> OptimizerConfig:
    params = json_object(raw)
    if "max_grad_norm" in params:  # DeepSpeed's engine refuses it for every optimizer type
        raise key_error("max_grad_norm", " is not supported as an optimizer parameter (as in "
                        "DeepSpeed): use the top-level 'gradient_clipping' instead")
    foreign = _ADAM_ONLY if kind == "Lamb" else _LAMB_ONLY
    valid = tuple(f.name for f in fields(OptimizerConfig)
                  if f.name != "type" and f.name not in foreign)
    owner = "an Adam/AdamW" if kind == "Lamb" else "a Lamb"
    notes = {name: f" for optimizer type {kind} (it is {owner} parameter)" for name in foreign}
    check_keys(params, valid, notes=notes)
    return OptimizerConfig(type=kind, **params)


def _dump_optimizer(opt: OptimizerConfig) -> dict[str, Any]:
    params = {k: v for k, v in dump(opt).items()
              if k != "type" and k not in (_ADAM_ONLY if opt.type == "Lamb" else _LAMB_ONLY)}
    return {"type": opt.type, "params": params}


# ---- the whole config ----

_OPT_BATCH = optional(integer(1, 2**31 - 1))  # beyond int32, samplers and shapes fail


@dataclass(frozen=True)
class Config:
    """A DeepSpeed JSON config, typed. Build with from_any/from_dict/from_file or keywords."""

    train_batch_size: int | None = setting(None, _OPT_BATCH)
    """Samples per optimizer step over all data-parallel ranks (see batch_sizes)."""
    train_micro_batch_size_per_gpu: int | None = setting(None, _OPT_BATCH)
    """Samples per forward/backward on one rank (see batch_sizes)."""
    gradient_accumulation_steps: int | None = setting(None, _OPT_BATCH)
    """Micro-batches per optimizer step (see batch_sizes)."""
    steps_per_print: int = setting(10, integer(1))
    """Log progress every this many optimizer steps."""
    optimizer: OptimizerConfig | None = setting(None, optional(instance(OptimizerConfig)),
                                                parse=_parse_optimizer, dump=_dump_optimizer)
    """The optimizer zerofx builds (None: the user passes one in)."""
    scheduler: SchedulerConfig | None = setting(None, optional(instance(SchedulerConfig)),
                                                parse=parse_scheduler)
    """The learning-rate schedule (None: constant lr)."""
    fp16: FP16Config = nested_setting(FP16Config)
    """float16 mixed precision with loss scaling."""
    bf16: BF16Config = nested_setting(BF16Config)
    """bfloat16 mixed precision."""
    activation_checkpointing: ActivationCheckpointingConfig = nested_setting(
        ActivationCheckpointingConfig)
    """Activation checkpointing, for zerofx.checkpointing (deepspeed.checkpointing) calls."""
    zero_optimization: ZeroConfig = nested_setting(ZeroConfig, parse=_parse_zero)
    """ZeRO stage and bucketing; JSON also takes DeepSpeed 2020's true (stage 1) / false."""
    gradient_clipping: float | None = setting(None, optional(_CLIP_NORM))
    """Clip gradients to this global L2 norm (0 disables; else at least 1e-6). Not given:
    DeepSpeed's default for the engine and the runtime (1.0 since DeepSpeed 0.19.3,
    runtime/constants.py GRADIENT_CLIPPING_DEFAULT; see clip_norm), nothing for plain
    torch.compile, where clipping is the user's loop's."""
    prescale_gradients: bool = setting(False, boolean)
    """Divide gradients by the data-parallel size before their reduction (else after)."""
    gradient_predivide_factor: float = setting(1.0, _PREDIVIDE)
    """Without prescale_gradients: divide by this before the reduction and by
    dp_size / factor after it (DeepSpeed's split of the averaging, against fp16 overflow)."""
    zero_allow_untested_optimizer: bool = setting(False, boolean)
    """Allow ZeRO (stage >= 1) with a torch optimizer other than Adam/AdamW (DeepSpeed's
    guard: such an optimizer steps each shard on its own, per-tensor math sees pieces)."""
    dataloader_drop_last: bool = setting(False, boolean)
    """The engine's loader drops a last incomplete batch (DeepSpeed's default: keep it)."""
    wall_clock_breakdown: bool = setting(False, boolean)
    """Log per-phase step timings (forward, backward, step)."""
    tensor_parallel: TensorParallelConfig = nested_setting(TensorParallelConfig)
    """Tensor (model) parallelism."""
    csv_monitor: MonitorConfig = nested_setting(MonitorConfig)
    """Training curves as CSV files, one per event (DeepSpeed's layout)."""
    tensorboard: MonitorConfig = nested_setting(MonitorConfig)
    """Training curves as TensorBoard event files (needs the tensorboard package)."""
    wandb: WandbConfig = nested_setting(WandbConfig)
    """Training curves in Weights & Biases (needs the wandb package)."""
    zerofx: ZerofxConfig = nested_setting(ZerofxConfig)
    """zerofx's own settings."""

    @property
    def clip_norm(self) -> float:
        """The global norm the engine and runtime clip to (0: none): gradient_clipping, or
        DeepSpeed's default when the config does not give it."""
        return DEEPSPEED_CLIP_DEFAULT if self.gradient_clipping is None else \
            self.gradient_clipping

    def __post_init__(self) -> None:
        validate(self)
        if self.fp16.enabled and self.bf16.enabled:
            raise key_error("bf16.enabled", " is true and so is 'fp16.enabled'; enable at most one")
        # The batch keys are checked against each other by batch_sizes(): that needs the
        # data-parallel world size, which a config does not know.

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """Parse a DeepSpeed-style config dict (as json.load returns it)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a JSON object (dict); got {show(d)}")
        from zerofx.config.deepspeed_keys import screen

        return parse_block(cls, screen(d))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        """Parse a JSON config file; messages start with the file name."""
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise ConfigError(f"a config file path must be a str or os.PathLike; got {show(path)}")
        name = os.fsdecode(path)
        try:
            return cls.from_dict(load_json(name))
        except ConfigError as e:
            raise e.in_file(name) from None

    @classmethod
    def from_any(cls, source: Config | Mapping | str | os.PathLike | None) -> Config:
        """None (defaults), a dict, a JSON file path, or a Config (returned as is)."""
        if source is None:
            return cls()
        if isinstance(source, Config):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if isinstance(source, (str, os.PathLike)):
            return cls.from_file(source)
        raise ConfigError("expected a Config, a dict, a JSON file path or None; "
                          f"got {type(source).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict; Config.from_dict(c.to_dict()) == c."""
        return dump(self)

    @property
    def compute_dtype(self) -> Any:
        """torch.float16 (fp16), torch.bfloat16 (bf16) or torch.float32."""
        import torch  # lazily: reading a config (e.g. in zerofx-launch) should not need torch

        if self.fp16.enabled:
            return torch.float16
        return torch.bfloat16 if self.bf16.enabled else torch.float32

    @property
    def pre_reduce_factor(self) -> float | None:
        """What gradients are multiplied by before their data-parallel reduction, as a
        fraction of the DP size (None: 1/dp_size, i.e. prescale_gradients)."""
        return None if self.prescale_gradients else 1.0 / self.gradient_predivide_factor

    def accumulation_steps(self, dp_world_size: int) -> int:
        """Micro-batches per optimizer step: from the batch keys when a batch size is given,
        else gradient_accumulation_steps (1 when unset)."""
        if self.train_batch_size is None and self.train_micro_batch_size_per_gpu is None:
            return self.gradient_accumulation_steps or 1
        return self.batch_sizes(dp_world_size).gradient_accumulation_steps

    def batch_sizes(self, dp_world_size: int) -> BatchSizes:
        """Resolve DeepSpeed's three batch keys for `dp_world_size` data-parallel ranks."""
        if not is_int(dp_world_size) or dp_world_size < 1:
            raise ConfigError(f"dp_world_size must be an integer >= 1; got {show(dp_world_size)}")
        return _resolve_batch(self.train_batch_size, self.train_micro_batch_size_per_gpu,
                              self.gradient_accumulation_steps, dp_world_size)


def _resolve_batch(total: int | None, micro: int | None, gas: int | None,
                   world: int) -> BatchSizes:
    """total = micro x gas x world; any two given determine the third, a lone total or micro
    means gas = 1 (DeepSpeed's rules)."""
    if total is None and micro is None:
        raise ConfigError("the batch size is not set: set train_batch_size and/or "
                          "train_micro_batch_size_per_gpu (gradient_accumulation_steps alone "
                          "does not determine it)")
    if total is None:
        gas = gas or 1
        total = micro * gas * world
    elif micro is None:
        gas = gas or 1
        micro = total // (gas * world)
        if micro * gas * world != total:
            raise ConfigError(f"train_batch_size={total} is not divisible by gradient_"
                              f"accumulation_steps({gas}) x world({world}) = {gas * world}")
    elif gas is None:
        gas = total // (micro * world)
        if micro * gas * world != total:
            raise ConfigError(f"train_batch_size={total} is not divisible by "
                              f"micro({micro}) x world({world}) = {micro * world}")
    if micro * gas * world != total:
        raise ConfigError(f"train_batch_size={total} is not micro({micro}) x "
                          f"gradient_accumulation_steps({gas}) x world({world}) = "
                          f"{micro * gas * world}")
    return BatchSizes(total, micro, gas)
