"""The typed blocks of zerofx's configuration (DeepSpeed's JSON blocks; config/root.py
assembles them into the whole ``Config``).

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

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

from zerofx.config.schema import (
    ConfigError, Invalid, bad, boolean, check_keys, checked, choice, default_of, dump,
    integer, json_object, key_error, names, nested_setting, number, optional,
    parse_block, parse_in, path_string, required_setting, setting, validate, zero_or,
)
from zerofx.config.scheduler import (  # noqa: F401  (re-exported by zerofx.config)
    MAX_LR, LRRangeTestParams, OneCycleParams, SchedulerConfig, WarmupCosineLRParams,
    WarmupDecayLRParams, WarmupLRParams,
)

__all__ = [
    "AioConfig", "BF16Config", "DataTypesConfig", "ConfigError", "FP16Config",
    "LRRangeTestParams", "OffloadOptimizerConfig", "OffloadParamConfig", "OneCycleParams",
    "OptimizerConfig", "SchedulerConfig", "TensorParallelConfig", "WarmupCosineLRParams",
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
PREDIVIDE = number(1e-6, 1e6, why="gradients are multiplied by 1/factor before their "
                                   "reduction; beyond these float32 underflows or overflows")
# A gradient norm to clip to (gradient_clipping, LAMB's max_grad_norm). Below 1e-6 each
# clipped gradient element sits under Adam's eps and the updates silently stop (1e-300 is
# 0 in float32); above 2**127 the norm is not a float32.
# DeepSpeed's gradient_clipping default since 0.19.3 (GRADIENT_CLIPPING_DEFAULT)
DEEPSPEED_CLIP_DEFAULT = 1.0
CLIP_NORM = zero_or(number(1e-6, MAX_SCALE, why="a smaller norm scales every gradient to "
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
class DataTypesConfig:
    """DeepSpeed's "data_types" block. Only what differs from the compute dtype is kept
    (config/deepspeed_keys.py screens the rest): fp32 gradient accumulation under bf16/fp16."""

    grad_accum_dtype: str | None = setting(None, optional(choice("fp32")))
    """"fp32": gradients accumulate and are reduced in fp32 (DeepSpeed's BF16 optimizer's
    rule); None: in the compute dtype."""

    def __post_init__(self) -> None:
        validate(self)


# DeepSpeed's AIO_BLOCK_SIZE_DEFAULT; below 4 KiB every call would move less than a page.
_AIO_BLOCK = integer(4096, 2**30)


@dataclass(frozen=True)
class OffloadOptimizerConfig:
    """DeepSpeed's "zero_optimization.offload_optimizer" block: where the fp32 master
    weights and the optimizer moments live (docs/offload.md). "cpu" on a run without a GPU
    is read as "none" (the state is in host memory already)."""

    device: str = setting("none", choice("none", "cpu", "nvme"))
    """none: in memory; cpu: in host memory, the step run there by the CPU kernels
    (ZeRO-Offload, for parameters on a GPU); nvme: in a file under nvme_path, streamed
    through memory in chunks (sub_group_size elements) by every optimizer step."""
    nvme_path: str | None = setting(None, optional(path_string))
    """The directory the state file goes in (a per-process subdirectory is made there)."""
    buffer_count: int = setting(4, integer(1, 64))
    """Chunk buffers in memory: 3 or more let the read of the next chunk and the write of
    the previous one run while the current one is updated (2: the read waits for the
    write; 1: nothing overlaps)."""
    pin_memory: bool = setting(True, boolean)
    """device cpu with a GPU: the host state and copy buffers are page-locked (asynchronous
    copies). Otherwise no effect: a CPU-only run has no GPU copies to speed up."""
    pipeline_read: bool = setting(False, boolean)
    """Accepted for DeepSpeed configs: zerofx always reads the next chunk during the
    update of the current one."""
    pipeline_write: bool = setting(False, boolean)
    """Accepted for DeepSpeed configs: zerofx always writes the previous chunk during the
    update of the current one."""
    fast_init: bool = setting(False, boolean)
    """Accepted for DeepSpeed configs: the file is preallocated (reads as zeros, the
    moments' start) and the master weights are written once, with or without it."""
    ratio: float = setting(1.0, number(0.0, 1.0))
    """The share of the state offloaded; only 1.0 (all of it) is implemented."""

    def __post_init__(self) -> None:
        validate(self)
        if self.device == "nvme" and self.nvme_path is None:
            raise bad("nvme_path", None, "the directory for the offloaded state (required "
                      "with device 'nvme')")
        if self.device != "none" and self.ratio != 1.0:
            raise bad("ratio", self.ratio, "1.0: zerofx offloads all of this rank's "
                      "optimizer state or none of it (a partial split is not implemented)")


@dataclass(frozen=True)
class OffloadParamConfig:
    """DeepSpeed's "zero_optimization.offload_param" block (ZeRO-Infinity, stage 3 only):
    where this rank's 16-bit parameter shard lives between uses (docs/offload.md). "cpu" on
    a run without a GPU is read as "none" (the shard is in host memory already)."""

    device: str = setting("none", choice("none", "nvme"))
    """none: in memory; nvme: in a file under nvme_path, read bucket by bucket for the
    gathers and rewritten by every optimizer step."""
    nvme_path: str | None = setting(None, optional(path_string))
    """The directory the parameter file goes in (a per-process subdirectory is made there)."""
    buffer_count: int = setting(5, integer(1, 64))
    """Buffers a bucket's shard is read into, held at once at most: the gathers in flight
    and the read of the next bucket hold one each, none between steps (1: no read ahead,
    one gather at a time)."""
    buffer_size: int = setting(100_000_000, integer(1))
    """Elements a buffer may hold: each is sized to the largest bucket's shard, which must
    fit (DeepSpeed's rule; lower stage3_prefetch_bucket_size to make buckets smaller)."""
    max_in_cpu: int = setting(1_000_000_000, integer(0))
    """Elements of the shard the optimizer step may hold in memory: zerofx's step writes
    the 16-bit shard by chunk (sub_group_size) through buffer_count buffers and keeps the
    persistent parameters' rows; that must fit (else refused)."""
    pin_memory: bool = setting(True, boolean)
    """Accepted for DeepSpeed configs: page-locked buffers serve GPU copies only."""

    def __post_init__(self) -> None:
        validate(self)
        if self.device == "nvme" and self.nvme_path is None:
            raise bad("nvme_path", None, "the directory for the offloaded parameters "
                      "(required with device 'nvme')")


@dataclass(frozen=True)
class AioConfig:
    """DeepSpeed's "aio" block: how the offloaded optimizer state's file is read and
    written (read only with offload_optimizer device nvme; its Linux AIO queue knobs are
    accepted without effect, config/deepspeed_keys.py)."""

    block_size: int = setting(1048576, _AIO_BLOCK)
    """Bytes per pread/pwrite call."""
    intra_op_parallelism: int = setting(1, integer(1, 64))
    """I/O threads per direction: each chunk's read (and write) is split among them."""

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
    offload_optimizer: OffloadOptimizerConfig = nested_setting(OffloadOptimizerConfig)
    """Where the optimizer state lives: memory, or files under nvme_path (stages 1-3)."""
    offload_param: OffloadParamConfig = nested_setting(OffloadParamConfig)
    """Where stage 3's 16-bit parameter shard lives between uses: memory, or a file under
    nvme_path (stage 3 only)."""
    sub_group_size: int | None = setting(None, optional(integer(1)))
    """With offload_optimizer device nvme: elements per chunk the step streams through
    memory (None: a sixteenth of the shard, within [2**20, 2**24]); a LAMB chunk never cuts
    a tensor's piece of a bucket, so it may be larger. Without offload the key has no
    effect (one flat shard)."""

    def __post_init__(self) -> None:
        validate(self)
        if self.offload_optimizer.device != "none" and self.stage == 0:
            raise key_error("offload_optimizer.device", f" is "
                            f"'{self.offload_optimizer.device}' at stage 0: optimizer "
                            "offload works at ZeRO stages 1-3 (as in DeepSpeed); set "
                            "zero_optimization.stage to 1, 2 or 3")
        if self.offload_param.device == "nvme" and self.stage != 3:
            raise key_error("offload_param.device", f" is 'nvme' at stage {self.stage}: "
                            "parameter offload works at ZeRO stage 3 only (as in DeepSpeed; "
                            "below it every rank keeps the whole parameters); set "
                            "zero_optimization.stage to 3 or drop offload_param")



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
    host_mmap_threshold: int | None = setting(
        None, optional(integer(16 << 10, 32 << 20, ceiling="glibc's largest, 32 MiB")))
    """glibc malloc's mmap threshold, fixed for the process (runtime/host_malloc.py): host
    blocks at or above it are unmapped when freed, so a CPU rank's resident memory follows
    its live tensors, as zerofx-plan counts them (glibc's own threshold rises with each
    freed block and leaves a step's freed activations resident: 17% more memory at 114M
    parameters), at the cost of faulting those blocks in anew (a 20% slower step there).
    131072 (glibc's starting value) for a job planned to the edge of memory; null (the
    default): glibc's allocator as it is. A MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    matmul_form: str = setting("host", choice("host", "native", "fp32"))
    """How CPU bf16/fp16 matmuls run (zerofx/cpu_gemm.py): host takes native GEMMs where the
    CPU has them (AVX512-BF16/FP16, AMX), fp32 with one rounding elsewhere; rank 0 decides."""

    def __post_init__(self) -> None:
        validate(self)


def parse_zero(raw: Any) -> ZeroConfig:
    if isinstance(raw, bool):  # the original 2020 form: "zero_optimization": true means stage 1
        return ZeroConfig(stage=int(raw))
    if not isinstance(raw, Mapping):
        raise Invalid("a JSON object, or true/false (DeepSpeed 2020's form of stage 1/0)")
    return parse_block(ZeroConfig, raw)


def parse_optimizer(raw: Any) -> OptimizerConfig | None:
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


def dump_optimizer(opt: OptimizerConfig) -> dict[str, Any]:
    params = {k: v for k, v in dump(opt).items()
              if k != "type" and k not in (_ADAM_ONLY if opt.type == "Lamb" else _LAMB_ONLY)}
    return {"type": opt.type, "params": params}
