"""DeepSpeed's keys that zerofx does not parse as settings: accepted without effect, or refused
by feature name, before the typed config sees the JSON.

A typo must stay an error ("did you mean"), but DeepSpeed's own keys are not typos: each is
either applied (a field of zerofx.config), accepted with a documented reason it changes
nothing here (logged once), or refused as a DeepSpeed feature zerofx does not implement, with
what to do instead. A block that is switched off (``false``, ``{}``, ``{"enabled": false}``,
a zero ``size``) is accepted whatever it is. ``"auto"`` values are the Hugging Face
Trainer/Accelerate integration's placeholders and get their own message.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from zerofx.config.schema import ConfigError, clip, dotted, find_path, show

log = logging.getLogger(__name__)

# key -> why it changes nothing in zerofx
NO_EFFECT = {
    "cuda_visible_devices": "zerofx-launch and torchrun choose devices per rank",
    "autotuning": "zerofx does not autotune; the block only matters to DeepSpeed's autotuner",
    "memory_breakdown": "zerofx reports state bytes in the plan dump instead",
    "dump_state": "the plan dump (zerofx.dump_dir) shows the layout",
    "checkpoint": "zerofx checkpoints always validate their files and tags",
    "zero_force_ds_cpu_optimizer": "an offloaded step always runs zerofx's fused Adam/LAMB",
    "comms_logger": "zerofx logs communication wait time with wall_clock_breakdown",
    "flops_profiler": "no FLOPs profiler in zerofx (use torch.profiler)",
    "elasticity": "zerofx does not resize jobs",
    "disable_allgather": "a legacy ZeRO-1 switch; zerofx's step always all-gathers",
    "vocabulary_size": "read only by DeepSpeed's sparse-embedding path",
    "legacy_fusion": "zerofx has its own fused optimizer step",
    "managed_gradient_accumulation": "zerofx always accumulates in its gradient buffers",
    "graph_harvesting": "a CUDA-graph option of DeepSpeed's engine",
    "seq_parallel_communication_data_type": "no sequence parallelism here",
    "timers": "zerofx times with wall_clock_breakdown",
    "use_data_before_expert_parallel_": "no expert parallelism here",
}

# key -> (DeepSpeed feature, what to do instead); refused unless switched off
REFUSED = {
    "compression_training": ("compression (quantization/pruning during training)",
                             "drop the block, or compress with DeepSpeed and train here"),
    "data_efficiency": ("data efficiency (curriculum learning, data routing)",
                        "drop the block; order your data in the loader"),
    "curriculum_learning": ("curriculum learning", "drop the block"),
    "progressive_layer_drop": ("progressive layer drop", "drop the block"),
    "sparse_attention": ("sparse attention kernels", "use dense attention (drop the block)"),
    "amp": ("NVIDIA apex amp", "use the bf16 or fp16 block"),
    "pipeline": ("pipeline parallelism", "use tensor_parallel and ZeRO"),
    "sequence_parallel_size": ("sequence parallelism (Ulysses)", "drop the key"),
    "hybrid_engine": ("the RLHF hybrid engine", "drop the block"),
    "eigenvalue": ("eigenvalue computation", "drop the block"),
    "quantize_training": ("quantized training", "drop the block"),
    "weight_quantization": ("weight quantization", "drop the block"),
    "nebula": ("Nebula checkpointing", "drop the block: zerofx saves atomically itself"),
    "comet": ("the Comet monitor", "drop the block; log from your loop"),
    "sparse_gradients": ("sparse embedding gradients", "drop the key"),
    "communication_data_type": ("a separate communication dtype",
                                "drop the key: buckets travel in the compute dtype"),
    "expert_parallel": ("expert parallelism (MoE)", "drop it: experts train data-parallel"),
}

# DeepSpeed's "compile" block (DeepCompile): zerofx is itself the compiler, so compiling is
# accepted; what DeepCompile adds on top is offload (refused) or tuning of its own schedule.
COMPILE_REFUSED = {k: ("DeepCompile offload (compile." + k + ")",
                       "drop it: zerofx keeps parameters, activations and state in memory")
                   for k in ("offload_activation", "offload_opt_states", "offload_parameters")}
COMPILE_NO_EFFECT = {
    "deepcompile": "zerofx always compiles: it is a torch.compile backend",
    **dict.fromkeys(("free_activation", "free_activation_threshold", "double_buffer",
                     "symmetric_memory", "sync_before_reduce", "sync_after_reduce",
                     "sync_before_allgather", "sync_after_allgather",
                     "keep_int_input_tensors", "keep_all_input_tensors",
                     "offload_activation_pin_memory", "debug_log"),
                    "DeepCompile's own schedule; zerofx's passes decide that"),
}

# zero_optimization keys, likewise
ZERO_NO_EFFECT = {
    "allgather_partitions": "zerofx always all-gathers the updated shards",
    "load_from_fp32_weights": "zerofx always restores from the fp32 master copy",
    "elastic_checkpoint": "zerofx checkpoints load at any data-parallel size",
    "round_robin_gradients": "an ordering of gradient copies to the host; zerofx's "
                             "gradients stay where they are reduced",
    "ignore_unused_parameters": "unused parameters always get a zero gradient (docs/real-models.md)",
    "use_multi_rank_bucket_allreduce": "zerofx reduces one bucket per collective",
    "sub_group_size": "read only with offload_optimizer or offload_param device nvme (the "
                      "fused optimizer runs over one flat shard)",
    "memory_efficient_linear": "a ZeRO-3 option",
    "log_trace_cache_warnings": "a ZeRO-3 option",
    "legacy_stage1": "zerofx has one stage-1 implementation",
    "pipeline_loading_checkpoint": "a ZeRO-3 option",
    "override_module_apply": "a ZeRO-3 option",
    "module_granularity_threshold": "zerofx gathers by bucket, not by module",
    "use_all_reduce_for_fetch_params": "zerofx gathers with all-gather",
    "allgather_sequential": "zerofx gathers by bucket",
    "mics_hierarchical_params_gather": "a MiCS option",
    "zeropp_loco_param": "a ZeRO++ option",
    "cpu_offload_use_pin_memory": "pinned buffers serve GPU copies; none here",
}
# ZeRO-3 keys DeepSpeed also takes without the stage3_ prefix
STAGE3_ALIASES = ("prefetch_bucket_size", "param_persistence_threshold",
                  "model_persistence_threshold", "max_live_parameters", "max_reuse_distance",
                  "gather_16bit_weights_on_model_save", "gather_fp16_weights_on_model_save")
ZERO_REFUSED = {
    "cpu_offload": ("ZeRO-Offload (cpu_offload)", "drop it"),
    "zero_quantized_weights": ("ZeRO++ quantized weights", "drop it"),
    "zero_quantized_gradients": ("ZeRO++ quantized gradients", "drop it"),
    "zero_hpz_partition_size": ("ZeRO++ hierarchical partitioning", "drop it"),
    "mics_shard_size": ("MiCS sharding", "drop it"),
    "cpu_offload_param": ("ZeRO-Offload of parameters", "drop it"),
    "zero_quantized_nontrainable_weights": ("ZeRO++ quantized frozen weights", "drop it"),
    "zenflow": ("ZenFlow (stall-free offloaded optimizer steps)", "drop it"),
}
# offload_optimizer keys of DeepSpeed's that zerofx does not parse
OFFLOAD_NO_EFFECT = {"cpuadam_cores_perc": "the update runs on this process's threads"}
OFFLOAD_REFUSED = {"super_offload": ("SuperOffload (Grace-Hopper superchips)", "drop it")}
# aio keys that change nothing here: zerofx's I/O threads make blocking calls
AIO_NO_EFFECT = {k: "zerofx's I/O threads make blocking pread/pwrite calls (no Linux AIO "
                    "queue); reads and writes always overlap the update"
                 for k in ("queue_depth", "single_submit", "overlap_events")}
AIO_REFUSED = {"use_gds": ("GPUDirect Storage (aio.use_gds)", "drop it: it needs CUDA")}
STAGE3_PREFIX = "stage3_"
ONE_BIT = {"onebitadam", "zerooneadam", "onebitlamb"}
FP16_REFUSED = {"fp16_master_weights_and_grads": ("fp16 master weights", "drop it")}
BF16_REFUSED = {"bf16_master_weights_and_grads": ("bf16 master weights", "drop it: zerofx "
                                                  "keeps fp32 masters"),
                "bf16_optimizer_states": ("bf16 optimizer states", "drop it")}
BF16_NO_EFFECT = {"immediate_grad_update": "gradients always go to their buckets at once",
                  "check_grad_overflow": "zerofx always skips a step whose gradients are "
                                         "not finite, in bf16 too (DeepSpeed's true); "
                                         "false does not make it apply them"}


def is_off(value: Any) -> bool:
    """false / {} / {"enabled": false} / a size of 1 or less / device none."""
    if value is None or value is False or value == {} or value == [] or value == 0:
        return True
    if value == 1 and not isinstance(value, bool):
        return True  # sequence_parallel_size 1
    if isinstance(value, Mapping):
        if value.get("enabled") is False:
            return True
        if "device" in value and value["device"] in ("none", None):
            return True
        if "deepcompile" in value and not value.get("deepcompile"):
            return all(not v for k, v in value.items() if k != "passes")
    return False


def refuse(key: str, feature: str, instead: str) -> ConfigError:
    # `feature` may quote the user's value: show() it where it is built
    return ConfigError(f"config key '{clip(key)}': DeepSpeed feature {feature} is not "
                       f"supported by zerofx; {instead}", key=key)


def find_auto(raw: Any) -> None:
    """A ConfigError for the first "auto" value anywhere in `raw` (a walk that builds no
    path until it finds one: a config may hold a 10 MB array)."""
    found = find_path(raw, lambda v: isinstance(v, str) and v == "auto")
    if found is None:
        return
    path = dotted(found[0])
    raise ConfigError(
        f"config key '{clip(path)}' is \"auto\": that value is filled in from the Hugging "
        f"Face Trainer's arguments; train with zerofx.hf.ZerofxTrainer (it fills \"auto\" "
        f"as HF's DeepSpeed integration does), or write the number here", key=path)


def screen(raw: Mapping) -> dict:
    """The config without the keys that have no effect (logged once), or a ConfigError for
    a DeepSpeed feature zerofx does not implement or an "auto" value."""
    find_auto(raw)
    notes: list[str] = []
    out = _screen_block("", raw, REFUSED, NO_EFFECT, notes, off=is_off)
    if isinstance(raw.get("zero_optimization"), Mapping):
        out["zero_optimization"] = _screen_zero(raw["zero_optimization"], notes)
    for block, refused, quiet in (("fp16", FP16_REFUSED, {}), ("bf16", BF16_REFUSED,
                                                                BF16_NO_EFFECT)):
        if isinstance(raw.get(block), Mapping):  # boolean flags: refused when true
            out[block] = _screen_block(block, raw[block], refused, quiet, notes,
                                       off=lambda v: not v)
    if isinstance(raw.get("compile"), Mapping):
        unknown = sorted(set(raw["compile"]) - set(COMPILE_REFUSED) - set(COMPILE_NO_EFFECT)
                         - {"passes"})  # passes: _map_compile_passes
        if unknown:
            raise refuse(f"compile.{unknown[0]}", f"DeepCompile's {clip(str(unknown[0]))}",
                         "drop it")
        _screen_block("compile", raw["compile"], COMPILE_REFUSED, COMPILE_NO_EFFECT, notes,
                      off=lambda v: not v)
        del out["compile"]
    elif "compile" in raw:  # DeepSpeed's block is a mapping; anything else is not its shape
        raise refuse("compile", f"compile: {show(raw['compile'])}", "give DeepSpeed's compile "
                     "block as a mapping, e.g. {\"deepcompile\": true}, or drop it")
    if isinstance(raw.get("tensor_parallel"), Mapping):
        out["tensor_parallel"] = _map_autotp(raw["tensor_parallel"], notes)
    if isinstance(raw.get("compile"), Mapping) and raw["compile"].get("passes") is not None:
        _map_compile_passes(raw["compile"]["passes"], raw, out, notes)
    if isinstance(raw.get("torch_autocast"), Mapping):
        _map_torch_autocast(raw["torch_autocast"], out, notes)
    _screen_optimizer(raw.get("optimizer"), out, notes)
    _screen_reduction(raw, out, notes)
    _screen_aio(raw, out, notes)
    if notes:
        # a warning, not info: a key that changes nothing is worth seeing once
        log.warning("zerofx: accepted without effect: %s", "; ".join(notes))
    return out


def offloads_to_nvme(raw: Mapping, blocks=("offload_optimizer", "offload_param")) -> bool:
    """Whether the raw config puts state on NVMe through one of ``blocks`` (aio is read for
    either, and sub_group_size: the chunk the step streams the state and the parameters in)."""
    zero = raw.get("zero_optimization")
    if not isinstance(zero, Mapping):
        return False
    return any(isinstance(zero.get(b), Mapping) and zero[b].get("device") == "nvme"
               for b in blocks)


def _screen_aio(raw: Mapping, out: dict, notes: list) -> None:
    """The aio block is read with NVMe offload (its Linux AIO knobs noted), else noted."""
    if "aio" not in raw:
        return
    if not offloads_to_nvme(raw):
        notes.append("aio (read only with offload_optimizer or offload_param device nvme)")
        del out["aio"]
    elif isinstance(raw["aio"], Mapping):
        out["aio"] = _screen_block("aio", raw["aio"], AIO_REFUSED, AIO_NO_EFFECT, notes,
                                   off=lambda v: not v)


def _screen_offload(zero: Mapping, notes: list) -> dict:
    """offload_optimizer switched off is dropped (the state stays in memory); switched on,
    DeepSpeed's keys zerofx does not parse are noted or refused."""
    out = dict(zero)
    block = zero.get("offload_optimizer")
    if "offload_optimizer" in zero and is_off(block):
        del out["offload_optimizer"]
    elif isinstance(block, Mapping):
        out["offload_optimizer"] = _screen_block(
            "zero_optimization.offload_optimizer", block, OFFLOAD_REFUSED, OFFLOAD_NO_EFFECT,
            notes, off=lambda v: not v)
    param = zero.get("offload_param")
    if "offload_param" in zero and is_off(param):
        del out["offload_param"]
    elif isinstance(param, Mapping) and param.get("device") == "cpu":  # with a GPU
        raise refuse("zero_optimization.offload_param", "parameter offload to the host with "
                     "a GPU (offload_param device 'cpu')", "drop it or set device 'none' "
                     "(device 'nvme' is implemented on CPU-only runs at stage 3)")
    return out


def _screen_zero(zero: Mapping, notes: list) -> dict:
    zero = _screen_offload(_host_offload(zero, notes), notes)
    quiet = dict(ZERO_NO_EFFECT)
    if offloads_to_nvme({"zero_optimization": zero}):
        del quiet["sub_group_size"]  # the chunk the step streams the state and parameters in
    staged = {k: v for k, v in zero.items() if k.startswith(STAGE3_PREFIX) or k in STAGE3_ALIASES}
    if zero.get("stage") != 3:
        quiet.update((k, "only read at stage 3") for k in staged)
        return _screen_block("zero_optimization", zero, ZERO_REFUSED, quiet, notes, off=is_off)
    # Stage 3: DeepSpeed's unprefixed aliases and the old fp16 spelling name zerofx's keys.
    out = {k: v for k, v in zero.items() if k not in staged}
    for key, value in staged.items():
        name = key if key.startswith(STAGE3_PREFIX) else STAGE3_PREFIX + key
        name = name.replace("gather_fp16_weights", "gather_16bit_weights")
        if name.removeprefix(STAGE3_PREFIX) in ZERO_NO_EFFECT:
            notes.append(f"zero_optimization.{key}: {ZERO_NO_EFFECT[name[len(STAGE3_PREFIX):]]}")
            continue
        if name in out and out[name] != value:
            raise ConfigError(f"config keys 'zero_optimization.{clip(key)}' and '{clip(name)}' "
                              f"spell one setting with different values; keep only "
                              f"{clip(name)}",
                              key=f"zero_optimization.{key}")
        out[name] = value
    return _screen_block("zero_optimization", out, ZERO_REFUSED, quiet, notes, off=is_off)


# Tests and benchmarks/gpu_check.py only, never a user setting: "1" keeps
# offload_optimizer device cpu on a run without a GPU, and the runtime then runs the GPU
# path's host offload (runtime/offload/host.py) on CPU parameters, every copy real.
FORCE_HOST_OFFLOAD_ENV = "ZEROFX_FORCE_HOST_OFFLOAD"


def host_offload_forced() -> bool:
    import os

    return os.environ.get(FORCE_HOST_OFFLOAD_ENV) == "1"


def _host_offload(zero: Mapping, notes: list) -> Mapping:
    """Offload to ``cpu`` on a run without a GPU: the state is in host memory already, so
    the key is met as it stands (said once; offload_optimizer's kept when
    host_offload_forced). With a GPU, offload_optimizer's is ZeRO-Offload (kept)."""
    keys = [k for k in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(k), Mapping) and zero[k].get("device") == "cpu"]
    if zero.get("cpu_offload") is True:
        keys.append("cpu_offload")
    import torch

    if not keys:
        return zero
    if torch.cuda.is_available():  # offload_optimizer: runtime/offload/host.py;
        return zero  # offload_param: _screen_offload's; cpu_offload: ZERO_REFUSED's
    kept = {"offload_optimizer"} if host_offload_forced() else set()
    for k in keys:
        if k not in kept:
            notes.append(f"zero_optimization.{k} to cpu (no GPU here: parameters and "
                         f"optimizer state already live in host memory)")
    return {k: v for k, v in zero.items() if k not in keys or k in kept}


def _screen_block(block: str, raw: Mapping, refused: dict, quiet: dict, notes: list, *,
                  off) -> dict:
    """``raw`` without its ``quiet`` keys (noted with their reason) and its ``refused`` keys
    that are switched off (``off(value)``); a refused key switched on is an error."""
    out = dict(raw)
    for key, value in raw.items():
        path = f"{block}.{key}" if block else key
        if key in quiet:
            notes.append(f"{path} ({quiet[key]})")
            del out[key]
        elif key in refused:
            if not off(value):
                raise refuse(path, *refused[key])
            del out[key]
    return out


AUTOTP_REFUSED = {
    "partition_config": ("AutoTP partition rules", "give zerofx's tensor_parallel.plan"),
    "injection_policy_tuple": ("AutoTP injection policies", "give tensor_parallel.plan"),
    "preset_model": ("AutoTP model presets", "give tensor_parallel.plan or let zerofx find "
                                              "the layout"),
    "replace_with_kernel_inject": ("DeepSpeed's inference kernel injection", "drop it"),
    "kernel_inject": ("DeepSpeed's inference kernel injection", "drop it"),
    "mpu": ("an mpu object in the config", "pass mpu= to zerofx.initialize"),
    "tp_group": ("a process group in the config", "drop it: zerofx makes the groups"),
}
AUTOTP_NO_EFFECT = {
    "tp_overlap_comm": "zerofx orders TP collectives in its graph passes",
    "tp_grain_size": "zerofx splits by whole heads and whole rows/columns",
    "dtype": "the bf16/fp16 block sets the compute dtype",
    "keep_module_on_host": "weights are split when the runtime is built",
}


def _map_autotp(block: Mapping, notes: list) -> dict:
    """DeepSpeed's training AutoTP keys inside "tensor_parallel": ``autotp_size`` (or its
    ``tp_size``/``tp`` spellings) is zerofx's ``size``: zerofx finds the layout from the
    model as AutoTP does."""
    out = _screen_block("tensor_parallel", block, AUTOTP_REFUSED, AUTOTP_NO_EFFECT, notes,
                        off=lambda v: not v)
    sizes = {k: out.pop(k) for k in ("autotp_size", "tp_size") if k in out}
    inner = out.pop("tp", None)
    if isinstance(inner, Mapping) and "tp_size" in inner:
        sizes["tp.tp_size"] = inner["tp_size"]
    given = [v for v in sizes.values() if v not in (0, None)]
    if "size" in out:
        given.append(out["size"])  # whatever it is: the Config check names a bad value
    if any(v != given[0] for v in given):
        raise refuse("tensor_parallel.autotp_size", f"tensor_parallel sizes {show(given)}",
                     "give one size")
    if given:
        out["size"] = given[0]
    if sizes:
        notes.append("tensor_parallel.autotp_size (applied as tensor_parallel.size)")
    return out


# DeepCompile's pass names (deepspeed.compile.config.PassName) -> the zerofx setting that does
# that job: ZeRO by zero_optimization.stage, AutoTP by tensor_parallel (zerofx finds the
# layout from the traced graph, as AutoTP does).
_ZERO_PASS_STAGES = {"z1": (1, 2), "z3": (3,)}


def _map_compile_passes(passes: Any, raw: Mapping, out: dict, notes: list) -> None:
    """compile.passes: each DeepCompile pass must agree with what zerofx's config already
    says (zerofx runs its own passes); AutoSP (Ulysses sequence parallelism) is refused."""
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise refuse("compile.passes", f"compile.passes {show(passes)}",
                     'give a list of DeepCompile pass names, e.g. ["z1"], or drop it')
    zero = raw.get("zero_optimization")
    stage = int(zero) if isinstance(zero, bool) else \
        zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    tp = out.get("tensor_parallel", {}).get("size", 1) if isinstance(
        out.get("tensor_parallel"), Mapping) else 1
    for name in passes:
        if name == "autosp":
            raise refuse("compile.passes", "DeepCompile's AutoSP pass (Ulysses sequence "
                         "parallelism)", "drop \"autosp\": zerofx's sequence parallelism is "
                         "Megatron's, with tensor parallelism (tensor_parallel."
                         "sequence_parallel)")
        if name in _ZERO_PASS_STAGES:
            if stage not in _ZERO_PASS_STAGES[name]:
                want = " or ".join(map(str, _ZERO_PASS_STAGES[name]))
                raise refuse("compile.passes", f"compile.passes {name!r} with "
                             f"zero_optimization.stage {show(stage)}",
                             f"set zero_optimization.stage to {want}, or drop {name!r}: "
                             f"zerofx's ZeRO passes follow the stage")
        elif name == "autotp":
            if not isinstance(tp, int) or tp < 2:
                raise refuse("compile.passes", "compile.passes 'autotp' without a "
                             "tensor-parallel size", "set tensor_parallel.autotp_size (or "
                             "size) to 2 or more, or drop 'autotp'")
        else:
            raise refuse("compile.passes", f"DeepCompile pass {show(name)}",
                         'use "z1", "z3" or "autotp" (what zerofx maps), or drop it')
    notes.append(f"compile.passes {passes} (zerofx's own passes do these jobs: ZeRO by "
                 f"zero_optimization.stage, AutoTP by tensor_parallel)")


_AUTOCAST_DEFAULT_MODULES = {"torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d",
                             "torch.nn.Conv3d", "torch.nn.modules.linear.Linear"}


def _map_torch_autocast(block: Mapping, out: dict, notes: list) -> None:
    """DeepSpeed's torch_autocast (fp32 weights, the forward under torch.autocast) is what
    zerofx's bf16/fp16 blocks do: autocast's op policy inside the graph, fp32 masters. It
    maps onto them; what cannot map is refused."""
    del out["torch_autocast"]
    unknown = sorted(set(block) - {"enabled", "dtype", "lower_precision_safe_modules"})
    if unknown:
        raise refuse(f"torch_autocast.{unknown[0]}", f"torch_autocast.{clip(str(unknown[0]))}",
                     "drop the key")
    if not block.get("enabled", False):
        return
    dtype = _DTYPE_NAMES.get(str(block.get("dtype", "bfloat16")).lower())
    if dtype not in ("bf16", "fp16"):
        raise refuse("torch_autocast.dtype", f"torch_autocast with dtype "
                     f"{show(block.get('dtype'))}", 'use "bfloat16" or "float16"')
    modules = block.get("lower_precision_safe_modules")
    if modules is not None and not set(modules) <= _AUTOCAST_DEFAULT_MODULES:
        raise refuse("torch_autocast.lower_precision_safe_modules",
                     f"per-module autocast lists ({show(sorted(set(modules)))})",
                     "drop the key: zerofx runs matmul-class ops (Linear, Conv) in low "
                     "precision and precision-sensitive ops in fp32 for every module")
    if _on(out.get("bf16")) or _on(out.get("fp16")):
        raise refuse("torch_autocast", "torch_autocast together with the bf16/fp16 block",
                     "keep one of them: they mean the same here")
    out["bf16" if dtype == "bf16" else "fp16"] = {"enabled": True}
    notes.append(f"torch_autocast (applied as the {dtype} block: the same op policy inside "
                 f"the graph, fp32 master weights)")


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
                "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16"}


def _screen_reduction(raw: Mapping, out: dict, notes: list) -> None:
    """data_types.grad_accum_dtype, gradient_allreduce_op, managed_gradient_accumulation:
    zerofx accumulates gradients in the compute dtype (or fp32: data_types), averages them,
    and ends a window every gradient_accumulation_steps step() calls; the DeepSpeed values
    that mean what zerofx does load."""
    if raw.get("managed_gradient_accumulation") is False:
        # DeepSpeed then makes every step() a boundary (backward only accumulates): a loop
        # written for it would take gradient_accumulation_steps times fewer updates here.
        raise refuse("managed_gradient_accumulation", "managed_gradient_accumulation false "
                     "(every step() reduces and updates)", "drop it and set "
                     "gradient_accumulation_steps, or choose boundaries with "
                     "engine.set_gradient_accumulation_boundary()")
    if "gradient_allreduce_op" in raw:
        op = raw["gradient_allreduce_op"]
        if op != "mean":
            raise refuse("gradient_allreduce_op", f"gradient_allreduce_op {show(op)}",
                         "use \"mean\": zerofx averages gradients over data-parallel ranks")
        notes.append("gradient_allreduce_op (mean: what zerofx does)")
        del out["gradient_allreduce_op"]
    types = raw.get("data_types")
    if types is None:
        return
    accum = types.get("grad_accum_dtype") if isinstance(types, Mapping) else types
    compute = "fp16" if _on(raw.get("fp16")) else "bf16" if _on(raw.get("bf16")) else "fp32"
    name = _DTYPE_NAMES.get(str(accum).lower()) if accum is not None else compute
    if name == "fp32" and compute != "fp32":
        # DeepSpeed's BF16 optimizer (and its ZeRO optimizers' gradient_accumulation_dtype):
        # the gradients of the micro-steps summed, and reduced, in fp32
        out["data_types"] = {"grad_accum_dtype": "fp32"}
        return
    if name != compute:
        to = repr(compute) + ("" if compute == "fp32" else " or 'fp32'")
        raise refuse("data_types.grad_accum_dtype", f"grad_accum_dtype {show(accum)} with "
                     f"{compute} compute", f"zerofx accumulates gradients in the compute "
                     f"dtype or in fp32: drop the key or set it to {to}")
    notes.append("data_types (gradients accumulate in the compute dtype)")
    del out["data_types"]


def _on(block: Any) -> bool:
    return isinstance(block, Mapping) and block.get("enabled") is True


# DeepSpeed's engine (get_optimizer_configuration) pops torch_adam: true builds
# torch.optim.Adam/AdamW over the remaining params, so torch's own keys ride along
_TORCH_ADAM_KEYS = ("fused", "foreach")


def _screen_optimizer(raw: Any, out: dict, notes: list[str]) -> None:
    if isinstance(raw, Mapping) and isinstance(raw.get("type"), str) \
            and raw["type"].lower() in ONE_BIT:
        raise refuse("optimizer.type", f"{raw['type']} (1-bit communication compression)",
                     "use type Adam, AdamW or Lamb: the same update without compressed "
                     "communication")
    params = raw.get("params") if isinstance(raw, Mapping) else None
    if not isinstance(params, Mapping) or str(raw.get("type", "")).lower() not in (
            "adam", "adamw"):
        return
    kept = dict(params)
    if params.get("amsgrad"):
        raise refuse("optimizer.params.amsgrad", "AMSGrad", "zerofx's fused Adam has no "
                     "AMSGrad (nor has DeepSpeed's FusedAdam; its torch_adam path runs "
                     "torch.optim's): drop the key, or pass optimizer=torch.optim.AdamW(params, "
                     "amsgrad=True) to zerofx.initialize, which runs your optimizer on each "
                     "shard")
    if "amsgrad" in kept:
        del kept["amsgrad"]
        notes.append("optimizer.params.amsgrad false (plain Adam)")
    if "torch_adam" in kept:
        on = kept.pop("torch_adam")
        if on:  # torch's own implementation switches, read only by torch.optim's Adam
            for key in _TORCH_ADAM_KEYS:
                if key in kept:
                    del kept[key]
                    notes.append(f"optimizer.params.{key} (torch.optim's implementation "
                                 f"choice)")
        notes.append("optimizer.params.torch_adam (zerofx's fused Adam computes the update "
                     "torch.optim.Adam/AdamW computes)")
    if kept != dict(params):
        out["optimizer"] = dict(raw, params=kept)
