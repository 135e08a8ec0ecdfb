"""What the offload features (docs/offload.md, zerofx/runtime/offload/) take out of memory
per rank, where it goes, and what they move per step, by the runtime's own layout code.

    optimizer, nvme   offload_optimizer device nvme (CPU runs, offload/state.py): the fp32
                      master and the two moments in a file of 12 bytes per shard element;
                      memory holds buffer_count chunk buffers (3 fp32 fields x the longest
                      chunk of offload.state.chunk_plan: sub_group_size elements, or
                      offload.default_chunk's) for the whole run. Each applied step reads
                      and writes the state: Adam 12 + 12 bytes per element; LAMB two passes
                      (24 read: everything twice; 12 written: the moments, then the master)
    optimizer, cpu    with parameters on a GPU (offload/host.py): the state and two staging
                      shards (the gradients in, the updated compute-dtype values out) in
                      host memory, none of it on the device; each applied step copies the
                      gradient shard to the host and the updated shard back. On a CPU run
                      the state is in host memory already: nothing changes
    parameters, nvme  offload_param device nvme (stage 3, CPU runs, 2+ data-parallel ranks;
                      offload/params.py): the compute-dtype shard in a file. During the
                      gathers at most buffer_count buffers, each the largest gathered
                      bucket's owned range; the optimizer step writes the updated shard
                      chunk by chunk (offload/params.py's StepWriter): at most
                      min(buffer_count, chunks) buffers of the longest step chunk
                      (params.step_chunks: the optimizer state's when it is on NVMe too)
                      and the persistent buckets' rows, the step's all-gather source;
                      nothing is read back (a skipped step reads the rows only); the
                      gathers read each gathered bucket's range per gather, counted twice
                      per micro-step (forward and backward, the count
                      step_time.collectives uses): an upper bound, as a gather the
                      backward reuses is read once (the block model: 12 reads, 14 counted)

The refusals are the runtime's, made at plan time with its messages: NVMe offload with a
GPU, parameter offload with one data-parallel rank, buffer_size or max_in_cpu below need.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zerofx.config import Config, ConfigError
from zerofx.plan import Plan
from zerofx.runtime.offload import default_chunk
from zerofx.runtime.offload.files import OffloadError
from zerofx.runtime.offload.params import _check_fits, step_chunks, step_numel, tail_offset
from zerofx.runtime.offload.state import _lamb_cuts, chunk_plan

_F32 = 4


@dataclass(frozen=True)
class OffloadFacts:
    """Per-rank bytes of the offloaded state (module doc); all zero without offload."""

    optimizer_nvme: bool = False
    optimizer_host: bool = False
    params_nvme: bool = False
    optimizer_buffers: int = 0  # NVMe chunk buffers, in memory for the whole run
    optimizer_file: int = 0
    param_file: int = 0
    param_buffers: int = 0  # at most, during the gathers
    param_step: int = 0  # the step's chunk buffers and the persistent rows, at most
    host: int = 0  # ZeRO-Offload's host memory (state + staging), not on the device
    optimizer_read: int = 0  # bytes per applied step, optimizer state file
    optimizer_written: int = 0
    param_step_read: int = 0  # bytes per step, the parameter file: the step's read (none)
    param_step_written: int = 0
    param_gather_read: int = 0  # and the gathers' reads
    to_host: int = 0  # ZeRO-Offload's copies per applied step
    to_device: int = 0

    @property
    def nvme(self) -> int:
        """Bytes of this rank's files."""
        return self.optimizer_file + self.param_file


def optimizer_kind(config: Config) -> str:
    opt = config.optimizer
    return "lamb" if opt is not None and opt.type == "Lamb" else "adam"


def offload_facts(plan: Plan, config: Config, *, gpu: bool) -> OffloadFacts:
    """What ``config``'s offload blocks do to ``plan``'s rank (module doc); ``gpu``: the
    parameters are on a GPU."""
    zero = config.zero_optimization
    opt, par = zero.offload_optimizer.device, zero.offload_param.device
    nvme_opt, host_opt, nvme_par = opt == "nvme", opt == "cpu" and gpu, par == "nvme"
    if not (nvme_opt or host_opt or nvme_par):
        return OffloadFacts()
    if (nvme_opt or nvme_par) and gpu:
        key = "offload_optimizer" if nvme_opt else "offload_param"
        raise ConfigError(f"zero_optimization.{key}.device 'nvme' with parameters on a GPU: "
                          f"zerofx streams NVMe offload on CPU-only runs (with a GPU use "
                          f"offload_optimizer device 'cpu'); plan it with --device this-host "
                          f"or drop it", key=f"zero_optimization.{key}.device")
    if config.optimizer is None:
        raise ConfigError("offload runs zerofx's fused Adam, AdamW or Lamb: the config needs "
                          "an \"optimizer\" block (a torch optimizer object is refused)")
    n = plan.shard_numel
    out = {"optimizer_nvme": nvme_opt, "optimizer_host": host_opt, "params_nvme": nvme_par}
    if nvme_opt:
        out.update(_optimizer_nvme(plan, config))
    if host_opt:
        out["host"] = n * (3 * _F32 + plan.grad_dtype.itemsize + plan.compute_dtype.itemsize)
        out["to_host"] = n * plan.grad_dtype.itemsize
        out["to_device"] = n * plan.compute_dtype.itemsize
    if nvme_par:
        out.update(_params_nvme(plan, config))
    return OffloadFacts(**out)


def _optimizer_nvme(plan: Plan, config: Config) -> dict:
    zero = config.zero_optimization
    n = plan.shard_numel
    cuts = None
    if optimizer_kind(config) == "lamb":
        cuts = _lamb_cuts(plan, [s.offset for s in plan.params] + [plan.padded_numel])
    chunks = chunk_plan(n, zero.sub_group_size or default_chunk(n), cuts)
    cap = max((b - a for a, b in chunks), default=0)
    state = 3 * _F32 * n
    lamb = optimizer_kind(config) == "lamb"
    return {"optimizer_buffers": zero.offload_optimizer.buffer_count * 3 * cap * _F32,
            "optimizer_file": state, "optimizer_read": 2 * state if lamb else state,
            "optimizer_written": state}


def _params_nvme(plan: Plan, config: Config) -> dict:
    off = config.zero_optimization.offload_param
    if not plan.partitioned:
        raise ConfigError(
            "config key 'zero_optimization.offload_param.device' is 'nvme' with one "
            "data-parallel rank: zerofx's stage 3 partitions the parameters across 2 or more "
            "data-parallel ranks, so there is no shard to offload; drop offload_param or plan "
            "2 or more data-parallel ranks", key="zero_optimization.offload_param.device")
    item = plan.compute_dtype.itemsize
    ranges = [r.numel for r in plan.owned()]  # bucket -> its owned range (params.py's)
    gathered = [ranges[b.index] for b in plan.buckets if b.offset < plan.persist_offset]
    cap = max(gathered, default=0)
    step = step_numel(off.buffer_count, step_chunks(config, plan),
                      plan.shard_numel - tail_offset(plan))
    try:
        _check_fits(cap, plan.shard_numel, buffer_size=off.buffer_size,
                    max_in_cpu=off.max_in_cpu, step=step)
    except OffloadError as e:
        raise ConfigError(str(e)) from None
    shard = plan.shard_numel * item
    gas = config.accumulation_steps(plan.grid.dp_size)
    return {"param_file": shard, "param_step": step * item, "param_step_read": 0,
            "param_step_written": shard,
            "param_buffers": min(off.buffer_count, len(gathered)) * cap * item,
            "param_gather_read": 2 * gas * sum(gathered) * item}


class StandIn:
    """What TrainState.allocate reads of an offload object: only whether there is one, and
    a host offload's own master (on the meta device here: not device memory)."""

    def __init__(self, host_master: torch.Tensor | None = None):
        if host_master is not None:
            self.host_master = host_master
