"""zerofx's configuration: typed, frozen blocks read from DeepSpeed's JSON format.

    blocks          the config blocks (fp16, bf16, zero_optimization, optimizer, zerofx, ...)
    root            Config, the blocks assembled and read from JSON; the batch-size rule
    scheduler       the "scheduler" block: DeepSpeed's four LR schedules' parameters
    deepspeed_keys  DeepSpeed's keys zerofx accepts without effect or refuses by feature
    schema          the generic machinery: checkers, typed fields, readers, ConfigError

Everything downstream imports the blocks from here and reads typed attributes, never raw
JSON keys (docs/design.md, conventions).
"""
from zerofx.config.blocks import (MAX_SCALE, MIN_STATIC_SCALE, ActivationCheckpointingConfig,
                                  BF16Config, FP16Config, MonitorConfig, OptimizerConfig,
                                  TensorParallelConfig, WandbConfig, ZeroConfig, ZerofxConfig)
from zerofx.config.root import BatchSizes, Config
from zerofx.config.scheduler import (MAX_LR, MAX_STEPS, LRRangeTestParams, OneCycleParams,
                                     SchedulerConfig, WarmupCosineLRParams, WarmupDecayLRParams,
                                     WarmupLRParams)
from zerofx.config.schema import ConfigError

__all__ = [
    "MAX_LR", "MAX_SCALE", "MAX_STEPS", "MIN_STATIC_SCALE", "ActivationCheckpointingConfig",
    "BF16Config", "BatchSizes", "Config", "ConfigError", "FP16Config", "LRRangeTestParams",
    "MonitorConfig", "OneCycleParams", "OptimizerConfig", "SchedulerConfig",
    "TensorParallelConfig", "WandbConfig", "WarmupCosineLRParams", "WarmupDecayLRParams",
    "WarmupLRParams", "ZeroConfig", "ZerofxConfig",
]
