"""The whole config: the blocks of config/blocks.py assembled into ``Config``, read from
DeepSpeed's JSON (a file, a dict, keywords), and DeepSpeed's batch-size rule (``BatchSizes``:
train_batch_size = micro x accumulation steps x data-parallel world size).

    cfg = Config.from_any("ds_config.json")          # or a dict, a Config, or None
    cfg.zero_optimization.stage, cfg.compute_dtype, cfg.batch_sizes(dp_world_size=4)
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from zerofx.config.blocks import (
    ActivationCheckpointingConfig, AioConfig, BF16Config, DataTypesConfig, FP16Config, MonitorConfig,
    OptimizerConfig, TensorParallelConfig, WandbConfig, ZeroConfig, ZerofxConfig,
    DEEPSPEED_CLIP_DEFAULT, CLIP_NORM, PREDIVIDE, parse_zero, parse_optimizer,
    dump_optimizer,
)
from zerofx.config.scheduler import (
    SchedulerConfig, parse_scheduler,
)
from zerofx.config.schema import (
    ConfigError, boolean, dump, instance, integer, is_int, key_error, load_json,
    nested_setting, optional, parse_block, setting, show, validate,
)


@dataclass(frozen=True)
class BatchSizes:
    """Resolved batch sizes: train_batch_size = micro x accumulation steps x DP world size."""

    train_batch_size: int
    """Samples per optimizer step, over all data-parallel ranks."""
    train_micro_batch_size_per_gpu: int
    """Samples per forward/backward on one rank."""
    gradient_accumulation_steps: int
    """Micro-batches accumulated per optimizer step."""



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
                                                parse=parse_optimizer, dump=dump_optimizer)
    """The optimizer zerofx builds (None: the user passes one in)."""
    scheduler: SchedulerConfig | None = setting(None, optional(instance(SchedulerConfig)),
                                                parse=parse_scheduler)
    """The learning-rate schedule (None: constant lr)."""
    fp16: FP16Config = nested_setting(FP16Config)
    """float16 mixed precision with loss scaling."""
    bf16: BF16Config = nested_setting(BF16Config)
    """bfloat16 mixed precision."""
    data_types: DataTypesConfig = nested_setting(DataTypesConfig)
    """The gradient accumulation dtype, where it is not the compute dtype."""
    activation_checkpointing: ActivationCheckpointingConfig = nested_setting(
        ActivationCheckpointingConfig)
    """Activation checkpointing, for zerofx.checkpointing (deepspeed.checkpointing) calls."""
    zero_optimization: ZeroConfig = nested_setting(ZeroConfig, parse=parse_zero)
    """ZeRO stage and bucketing; JSON also takes DeepSpeed 2020's true (stage 1) / false."""
    gradient_clipping: float | None = setting(None, optional(CLIP_NORM))
    """Clip gradients to this global L2 norm (0 disables; else at least 1e-6). Not given:
    DeepSpeed's default for the engine and the runtime (1.0 since DeepSpeed 0.19.3,
    runtime/constants.py GRADIENT_CLIPPING_DEFAULT; see clip_norm), nothing for plain
    torch.compile, where clipping is the user's loop's."""
    prescale_gradients: bool = setting(False, boolean)
    """Divide gradients by the data-parallel size before their reduction (else after)."""
    gradient_predivide_factor: float = setting(1.0, PREDIVIDE)
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
    aio: AioConfig | None = setting(None, optional(instance(AioConfig)),
                                    parse=partial(parse_block, AioConfig))
    """How the NVMe-offloaded optimizer state is read and written (None: the defaults)."""

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
    def grad_dtype(self) -> Any:
        """The dtype gradients accumulate and are reduced in: fp32 with
        data_types.grad_accum_dtype "fp32", else the compute dtype."""
        import torch

        return torch.float32 if self.data_types.grad_accum_dtype == "fp32" \
            else self.compute_dtype

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
