"""A predicted step time: the traced graphs' work at a device's rates, plus the collectives
the plan implies through the alpha-beta model (zerofx/comm_cost.py).

    matmuls        the graphs' matmul/convolution/attention FLOPs (planner/graphs.py; the
                   backward's include what it recomputes) at the device's matmul rate
    memory traffic every other op's bytes read and written, at the device's bandwidth
    optimizer step the fused AdamW over this rank's shard: about 32 bytes per element (fp32
                   master, exp_avg, exp_avg_sq read and written, the gradient read, the
                   compute-dtype parameter written), at the bandwidth
    collectives    per step, from the plan (ZeRO's volumes): stage 0 all-reduces the
                   gradients; stage 1 all-reduces them and all-gathers the updated
                   parameters; stage 2 reduce-scatters them and all-gathers the parameters;
                   stage 3 reduce-scatters them and all-gathers the partitioned parameters
                   twice per micro-step (forward, and again for the backward) and the
                   persistent ones once after the step

Rates. A GPU: its published dense peak in the compute dtype (bf16/fp16; fp32 without
TF32) x MATMUL_EFFICIENCY, its HBM bandwidth x MEMORY_EFFICIENCY, and ring collectives at
NVLink's bandwidth within a node of 8 and the network's (400 Gb/s per GPU) beyond; the
gradient reduction and ZeRO-3's gathers overlap the compute, the step's all-gather and the
optimizer step do not. ``this-host``: a matmul and a copy timed on the spot, on the threads
one rank gets; collectives at the rates the runtime's forms were measured at
(comm_cost.DEFAULT, 2 ranks on gloo; the fastest form the runtime may choose, scaled by
2(N-1)/N for N ranks), and nothing overlaps: each rank's core runs gloo's copies too.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from zerofx.comm_cost import DEFAULT, CommCost
from zerofx.config import Config, ConfigError
from zerofx.plan import Plan, gather_chunks

MIB = float(1 << 20)
# Large GEMMs reach about 60-70% of an H100's dense peak in cuBLAS; elementwise kernels
# about 70-80% of HBM bandwidth. The lower ends, as a whole model's kernels are not all large.
MATMUL_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.7
LINK_EFFICIENCY = 0.8  # of a link's bandwidth a ring collective's bus bandwidth reaches
OPTIMIZER_BYTES_PER_ELEMENT = 32
NODE_GPUS = 8


@dataclass(frozen=True)
class Device:
    """Rates one rank computes and communicates at (see the module doc)."""

    name: str
    matmul_flops: dict  # compute dtype -> FLOP/s used for the prediction
    bandwidth: float  # bytes/s of memory traffic used for the prediction
    source: str
    gloo: bool = False  # a CPU job: comm_cost's measured gloo rates, nothing overlaps
    nvlink: float = 0.0  # bytes/s per GPU per direction, within a node
    network: float = 0.0  # bytes/s per GPU across nodes
    latency_ms: float = 0.0


def _gpu(name, bf16_tflops, fp32_tflops, hbm_tbs, source) -> Device:
    return Device(name, {torch.bfloat16: bf16_tflops * 1e12 * MATMUL_EFFICIENCY,
                         torch.float16: bf16_tflops * 1e12 * MATMUL_EFFICIENCY,
                         torch.float32: fp32_tflops * 1e12 * MATMUL_EFFICIENCY},
                  hbm_tbs * 1e12 * MEMORY_EFFICIENCY,
                  f"{source}: {bf16_tflops:g} TFLOPS bf16 x {MATMUL_EFFICIENCY}, "
                  f"{hbm_tbs:g} TB/s x {MEMORY_EFFICIENCY}", nvlink=450e9, network=50e9,
                  latency_ms=0.02)


# NVIDIA's data sheets, SXM parts, dense (no sparsity): bf16 989 TFLOPS, fp32 67 TFLOPS;
# HBM3 3.35 TB/s (H100), HBM3e 4.8 TB/s (H200); NVLink 4 900 GB/s both directions.
GPUS = {"h100": _gpu("h100", 989.4, 66.9, 3.35, "H100 SXM data sheet"),
        "h200": _gpu("h200", 989.4, 66.9, 4.8, "H200 SXM data sheet")}
DEVICES = ("h100", "h200", "this-host")


def device_named(name: str, *, dtype: torch.dtype, ranks_here: int = 1) -> Device:
    """The Device ``name`` (DEVICES); ``this-host`` is timed now, on the threads each of
    ``ranks_here`` ranks on this host gets."""
    if name in GPUS:
        return GPUS[name]
    if name == "this-host":
        return measure_host(dtype, threads=max(1, (os.cpu_count() or 1) // ranks_here))
    raise ConfigError(f"unknown device {name!r}: zerofx-plan knows {', '.join(DEVICES)} "
                      f"(--device this-host times this machine)")


def measure_host(dtype: torch.dtype, *, threads: int = 1, n: int = 1024) -> Device:
    """This CPU's matmul rate (an n x n x n matmul in ``dtype``) and copy bandwidth (a 64 MiB
    copy), each the best of a few, on ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        mm = _best(lambda: torch.mm(a, b))
        src = torch.empty(1 << 24, dtype=torch.float32).fill_(1.0)
        dst = torch.empty_like(src)
        copy = _best(lambda: dst.copy_(src))
    finally:
        torch.set_num_threads(old)
    flops = 2 * n ** 3 / mm
    return Device("this-host", {dtype: flops}, 2 * src.nbytes / copy,
                  f"timed here: {n}^3 {str(dtype).removeprefix('torch.')} matmul "
                  f"{flops / 1e9:.0f} GFLOP/s, copy {2 * src.nbytes / copy / 1e9:.1f} GB/s, "
                  f"{threads} thread(s)", gloo=True)


def _best(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass(frozen=True)
class Collective:
    """One kind of collective a step runs: ``nbytes`` is the whole buffer it reduces or
    gathers, ``count`` how many times per step, over ``world`` ranks."""

    what: str
    role: str  # "all_reduce" | "reduce" | "gather" (the runtime's forms choose for the last two)
    nbytes: int
    count: int
    world: int
    overlapped: bool  # runs while the graphs compute (on a GPU)

    @property
    def volume(self) -> int:
        """Bytes each rank sends per step: a ring's (N-1)/N of the buffer, twice for an
        all-reduce."""
        share = (self.world - 1) / self.world
        return int(round(self.count * self.nbytes * share * (2 if self.role == "all_reduce"
                                                             else 1)))


def collectives(plan: Plan, config: Config) -> list[Collective]:
    """The data-parallel collectives of one step (module doc)."""
    dp, item = plan.grid.dp_size, plan.compute_dtype.itemsize
    if dp < 2:
        return []
    gas = config.accumulation_steps(dp)
    grads = plan.padded_numel * item
    out = [Collective("gradients " + ("reduce-scattered" if plan.reduces_into_shard
                                      else "all-reduced"),
                      "reduce" if plan.reduces_into_shard else "all_reduce", grads, 1, dp,
                      True)]
    if plan.partitioned and plan.persist_offset:
        out.append(Collective("ZeRO-3 parameters gathered (forward and backward)", "gather",
                              plan.persist_offset * item, 2 * gas, dp, True))
    if plan.sharded and gather_chunks(plan, config):
        out.append(Collective("updated parameters all-gathered", "gather",
                              (plan.padded_numel - plan.persist_offset) * item, 1, dp, False))
    return out


_FORMS = {"reduce": (("reduce_scatter", False), ("all_reduce", False), ("p2p_reduce", False),
                     ("shm_reduce", True)),
          "gather": (("all_gather", False), ("p2p_gather", False), ("shm_gather", True))}


def collective_ms(c: Collective, device: Device, *, shm: bool, cost: CommCost = DEFAULT) -> float:
    """Milliseconds of one step's ``c`` on ``device`` (module doc)."""
    if device.gloo:
        if c.role == "all_reduce":
            kinds = ["all_reduce"]
        else:  # the forms the runtime may choose (runtime/comm/forms.py); the fastest wins
            kinds = [k for k, needs_shm in _FORMS[c.role] if shm or not needs_shm]
            if c.world != 2:  # pairwise sums, and shm reduce, are offered at 2 ranks only
                kinds = [k for k in kinds if k != "p2p_reduce" and k != "shm_reduce"]
        scale = 2 * (c.world - 1) / c.world  # the rates were measured at 2 ranks
        return c.count * min(cost.predict_ms(k, c.nbytes) * scale for k in kinds)
    link = device.nvlink if c.world <= NODE_GPUS else device.network
    return c.count * device.latency_ms + c.volume / (link * LINK_EFFICIENCY) * 1e3


@dataclass
class StepTime:
    """A predicted step: each item's milliseconds, and the step."""

    items: list  # (what, ms, overlapped)
    device: Device
    ms: float

    def top(self, n: int = 5) -> list:
        return sorted(self.items, key=lambda it: -it[1])[:n]


def predict_step_time(mem, plan: Plan, config: Config, device: Device, *,
                      shm: bool = False) -> StepTime:
    """The step time of ``plan`` on ``device`` from ``mem.graphs`` (planner/graphs.py)."""
    gas = config.accumulation_steps(plan.grid.dp_size)
    rate = device.matmul_flops.get(plan.compute_dtype)
    if rate is None:
        raise ConfigError(f"zerofx-plan has no {plan.compute_dtype} matmul rate for "
                          f"{device.name}")
    fw = sum(g.fw_flops for g in mem.graphs) * gas
    bw = sum(g.bw_flops for g in mem.graphs) * gas
    moved = sum(g.fw_moved + g.bw_moved for g in mem.graphs) * gas
    items = [(f"forward matmuls ({fw / 1e9:.1f} GFLOP)", fw / rate * 1e3, False),
             (f"backward matmuls, recompute included ({bw / 1e9:.1f} GFLOP)",
              bw / rate * 1e3, False),
             (f"other ops' memory traffic ({moved / MIB:.0f} MiB)",
              moved / device.bandwidth * 1e3, False),
             ("optimizer step", plan.shard_numel * OPTIMIZER_BYTES_PER_ELEMENT
              / device.bandwidth * 1e3, False)]
    for c in collectives(plan, config):
        items.append((f"{c.what} ({c.nbytes / MIB:.1f} MiB x {c.count})",
                      collective_ms(c, device, shm=shm), c.overlapped and not device.gloo))
    serial = sum(ms for _, ms, ov in items if not ov)
    compute = sum(ms for what, ms, _ in items[:3])
    hidden = sum(ms for _, ms, ov in items if ov)
    # overlapped collectives cost only what the compute cannot cover
    return StepTime(items, device, serial + max(0.0, hidden - compute))
