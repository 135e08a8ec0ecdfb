"""A predicted step time: each op of the traced graphs priced by its class at a device's
rates (planner/rates.py), plus the collectives the plan implies through the alpha-beta model
(zerofx/comm_cost.py).

    matmuls        the graphs' matmul/convolution FLOPs (planner/graphs.py; the backward's
                   include what it recomputes) at the device's matmul rate in their dtype
    attention      scaled-dot-product attention's FLOPs at the attention rates (forward,
                   backward)
    other ops      each op's counted bytes at its class's rate in its dtype: copies, casts,
                   arithmetic, transcendental, reductions, softmax, norms, lookups, scatters
    dispatch       each op's launch from the graph's Python code: on a CPU added to its
                   work (the same core does both); on a GPU only the device's waits for the
                   host, which issues an op per launch time (a run of short ops, views
                   included, is launch-bound; behind long kernels the host runs ahead)
    fresh pages    a CPU: the page faults of memory the step touches anew. glibc serves
                   tensors of a MiB or more from the top of its heap, or from their own
                   mappings, and gives the memory back to the kernel once the backward frees
                   it (the trim threshold), so each micro-step faults in its transient peak
                   (activations, working tensors, ZeRO-3's gathered parameters) again, and
                   the optimizer step its temporaries; priced at the timed cost of writing
                   to fresh pages. A GPU's caching allocator keeps its blocks: none
    optimizer step the fused AdamW over this rank's shard (per element), and with gradient
                   clipping the gradient norm (a reduction over the shard's gradients)
    collectives    per step, from the plan (ZeRO's volumes): stage 0 all-reduces the
                   gradients; stage 1 all-reduces them and all-gathers the updated
                   parameters; stage 2 reduce-scatters them and all-gathers the parameters;
                   stage 3 reduce-scatters them and all-gathers the partitioned parameters
                   twice per micro-step (forward, and again for the backward) and the
                   persistent ones once after the step; with tensor parallelism, each
                   collective the split graphs run over the TP group (their all-reduces,
                   planner/graphs.py), per micro-step, on the critical path (the graph
                   waits for it right after)
    offload        (planner/offload.py) NVMe: the state bytes each applied step reads and
                   writes (Adam 12 + 12 per element, LAMB 24 + 12), offload_param's shard
                   read and written by the step and each gathered bucket's range read per
                   gather, at the disk's bandwidth, serial (the reads ahead and the
                   streamed chunks overlap the kernels, which share the cores here). Host
                   offload on a GPU: the host's fused step over the shard and the copies of
                   the gradient shard to the host and the updated shard back, pipelined
                   (the longer of the two), in place of the device's optimizer step

Rates. A GPU: its data sheet times assumed efficiencies (rates.gpu_rates), ring collectives
at NVLink's bandwidth within a node of 8 and the network's (400 Gb/s per GPU) beyond; the
gradient reduction and ZeRO-3's gathers overlap the compute, the step's all-gather and the
optimizer step do not. ``this-host``: each class timed once per process (rates.host_rates),
on the threads one rank gets; collectives at the rates the runtime's forms were measured at
(comm_cost.DEFAULT, 2 ranks on gloo; the fastest form the runtime may choose, scaled by
2(N-1)/N for N ranks), and nothing overlaps: each rank's core runs gloo's copies too.

Disk (NVMe offload, CPU runs only: with a GPU it is refused): ``--disk-gbps``, else timed
under the config's nvme_path (rates.disk_rates): through the page cache while the files of
the ranks on this host fit in half its memory, else with O_DIRECT. Host offload on a GPU
(not validated, no GPU measured): copies at HOST_LINK bytes/s per direction per GPU and the
host step at HOST_STEP_BYTES bytes per element over HOST_MEMORY bytes/s per GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from zerofx.comm_cost import DEFAULT, CommCost
from zerofx.config import Config, ConfigError
from zerofx.plan import Plan, gather_chunks
from zerofx.planner.rates import Rates, disk_rates, gpu_rates, host_rates

MIB = float(1 << 20)
LINK_EFFICIENCY = 0.8  # of a link's bandwidth a ring collective's bus bandwidth reaches
NODE_GPUS = 8
# Host offload with a GPU, assumed: PCIe Gen5 x16 moves 64 GB/s per direction on paper and
# pinned copies reach about 50; a node's 8 GPUs share the host's links and memory, so 25 GB/s
# each. The host's fused Adam reads and writes the fp32 master and moments (24 bytes per
# element) and reads the gradient and writes the 16-bit value (4 more), memory-bound: a
# two-socket host's ~500 GB/s of DDR5 at about half efficiency, shared by 8, is ~30 GB/s each.
HOST_LINK = 25e9
HOST_MEMORY = 30e9
HOST_STEP_BYTES = 28


@dataclass(frozen=True)
class Device:
    """Rates one rank computes and communicates at (see the module doc)."""

    name: str
    rates: Rates
    gloo: bool = False  # a CPU job: comm_cost's measured gloo rates, nothing overlaps
    nvlink: float = 0.0  # bytes/s per GPU per direction, within a node
    network: float = 0.0  # bytes/s per GPU across nodes
    latency_ms: float = 0.0

    @property
    def source(self) -> str:
        return self.rates.source


def _gpu(name, bf16_tflops, fp32_tflops, hbm_tbs, source) -> Device:
    return Device(name, gpu_rates(bf16_tflops, fp32_tflops, hbm_tbs, source), nvlink=450e9,
                  network=50e9, latency_ms=0.02)


# NVIDIA's data sheets, SXM parts, dense (no sparsity): bf16 989 TFLOPS, fp32 67 TFLOPS;
# HBM3 3.35 TB/s (H100), HBM3e 4.8 TB/s (H200); NVLink 4 900 GB/s both directions.
GPUS = {"h100": _gpu("h100", 989.4, 66.9, 3.35, "H100 SXM data sheet"),
        "h200": _gpu("h200", 989.4, 66.9, 4.8, "H200 SXM data sheet")}
DEVICES = ("h100", "h200", "this-host")


def device_named(name: str, *, dtype: torch.dtype, ranks_here: int = 1) -> Device:
    """The Device ``name`` (DEVICES); ``this-host`` is timed now (once per process), on the
    threads each of ``ranks_here`` ranks on this host gets."""
    if name in GPUS:
        return GPUS[name]
    if name == "this-host":
        return measure_host(dtype, threads=max(1, (os.cpu_count() or 1) // ranks_here))
    raise ConfigError(f"unknown device {name!r}: zerofx-plan knows {', '.join(DEVICES)} "
                      f"(--device this-host times this machine)")


def measure_host(dtype: torch.dtype, *, threads: int = 1) -> Device:
    """This CPU, its rates timed on ``threads`` threads (rates.host_rates, cached)."""
    return Device("this-host", host_rates(dtype, threads), gloo=True)


@dataclass(frozen=True)
class Collective:
    """One kind of collective a step runs: ``nbytes`` is the whole buffer it reduces or
    gathers, ``count`` how many times per step, over ``world`` ranks."""

    what: str
    # "all_reduce" | "reduce" | "gather" (the runtime's forms choose for these two) |
    # "all_gather" | "reduce_scatter" (the graphs' functional ones: torch's own, no choice)
    role: str
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


def tp_collectives(graphs, plan: Plan, config: Config) -> list[Collective]:
    """The tensor-parallel collectives the traced graphs run, per step (module doc): one
    Collective per kind and size, counted over the graphs and micro-steps."""
    gas = config.accumulation_steps(plan.grid.dp_size)
    count: dict = {}
    for g in graphs:
        for kind, nbytes in g.collectives:
            count[kind, nbytes] = count.get((kind, nbytes), 0) + gas
    names = {"all_reduce": "all-reduces", "all_gather": "all-gathers",
             "reduce_scatter": "reduce-scatters"}
    return [Collective(f"tensor-parallel {names[kind]}", kind, nbytes, n, plan.grid.tp_size,
                       False) for (kind, nbytes), n in sorted(count.items())]


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
        if c.role not in _FORMS:
            kinds = [c.role]
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


_LABELS = {"copy": "copies", "cast": "dtype casts", "arith": "arithmetic ops",
           "transcendental": "transcendental ops", "reduction": "reductions",
           "softmax": "softmax", "norm": "normalisations", "index": "lookups",
           "scatter": "scatter-adds"}


def graph_items(graphs, rates: Rates, gas: int) -> list:
    """(what, ms, False) of the graphs' ops by class, and their dispatch (module doc)."""
    secs: dict = {}
    amounts: dict = {}
    dispatch, count = 0.0, 0
    for g in graphs:
        for side, ops in (("forward", g.fw_ops), ("backward", g.bw_ops)):
            works = []
            for cls, dtype, amount in ops:
                work = amount / rates.rate(cls, dtype) if cls != "view" and amount else 0.0
                key = f"{side} {cls}" if cls in ("matmul", "attention") else cls
                key = "backward attention" if cls == "attention_bw" else key
                secs[key] = secs.get(key, 0.0) + work
                amounts[key] = amounts.get(key, 0) + amount
                works.append(work)
            dispatch += rates.dispatch_seconds(works)
            count += len(works)
    items = []
    for key, t in secs.items():
        if key == "view":
            continue
        side, _, cls = key.rpartition(" ")
        if cls == "matmul":
            what = f"{side} matmuls" + (", recompute included" if side == "backward" else "")
            what += f" ({amounts[key] * gas / 1e9:.1f} GFLOP)"
        elif cls == "attention":
            what = f"{side} attention ({amounts[key] * gas / 1e9:.1f} GFLOP)"
        else:
            what = f"{_LABELS[cls]} ({amounts[key] * gas / MIB:.0f} MiB)"
        items.append((what, t * gas * 1e3, False))
    items.append((f"op dispatch ({count * gas} ops x {rates.overhead_s * 1e6:.1f} us"
                  + (", where the device waits for it" if rates.async_dispatch else "") + ")",
                  dispatch * gas * 1e3, False))
    return items


def disk_of(mem, config: Config, *, ranks_here: int = 1,
            gbps: float | None = None) -> tuple[float, float, str]:
    """(write, read) bytes/s of the disk the offload files go to, and where it came from
    (module doc)."""
    if gbps is not None:
        return gbps * 1e9, gbps * 1e9, f"--disk-gbps {gbps:g}"
    zero = config.zero_optimization
    path = (zero.offload_optimizer.nvme_path if mem.offload.optimizer_nvme
            else zero.offload_param.nvme_path)
    if not path or not os.path.isdir(path):
        raise ConfigError(f"zerofx-plan times the disk under the offload's nvme_path "
                          f"{path!r}, which is not a directory here: create it, or give the "
                          f"disk's bandwidth with --disk-gbps")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    direct = mem.nvme * ranks_here > memory // 2  # the page cache cannot hold the files
    w, r = disk_rates(os.path.abspath(path), direct=direct)
    return w, r, f"timed under {path}" + (", O_DIRECT" if direct else ", page cache")


def offload_items(mem, plan: Plan, config: Config, *, disk=None) -> list:
    """(what, ms, False) of the offload's per-step work (module doc); ``disk``: disk_of's."""
    off, gas = mem.offload, config.accumulation_steps(plan.grid.dp_size)
    items = []
    if off.optimizer_nvme or off.params_nvme:
        w, r, source = disk
        for what, read, written in (
                ("optimizer state on NVMe", off.optimizer_read, off.optimizer_written),
                ("parameter shard on NVMe, the step", off.param_step_read,
                 off.param_step_written),
                (f"parameter reads on NVMe for the gathers (x {2 * gas})",
                 off.param_gather_read, 0)):
            if read or written:
                items.append((f"{what} ({read / MIB:.0f} MiB read, {written / MIB:.0f} MiB "
                              f"written; disk {r / 2**30:.2f}/{w / 2**30:.2f} GiB/s read/"
                              f"write, {source})", (read / r + written / w) * 1e3, False))
    if off.optimizer_host:
        host = plan.shard_numel * HOST_STEP_BYTES / HOST_MEMORY
        link = max(off.to_host, off.to_device) / HOST_LINK
        items.append((f"optimizer step on the host (ZeRO-Offload; {off.to_host / MIB:.0f} MiB "
                      f"to the host, {off.to_device / MIB:.0f} MiB back; assumed rates)",
                      max(host, link) * 1e3, False))
    return items


def predict_step_time(mem, plan: Plan, config: Config, device: Device, *,
                      shm: bool = False, disk=None) -> StepTime:
    """The step time of ``plan`` on ``device`` from ``mem.graphs`` (planner/graphs.py);
    ``disk``: disk_of's (write, read, source), needed with NVMe offload (timed under the
    nvme_path when not given)."""
    gas = config.accumulation_steps(plan.grid.dp_size)
    rates = device.rates
    dtype = plan.compute_dtype
    if ("matmul", dtype) not in rates.flops:
        raise ConfigError(f"zerofx-plan has no {dtype} matmul rate for {device.name}")
    items = graph_items(mem.graphs, rates, gas)
    if rates.fresh_page_s:
        fresh = (mem.activations + mem.working + mem.gathered) * gas + mem.step_temporary
        items.append((f"fresh pages ({fresh / MIB:.0f} MiB faulted in per step)",
                      fresh * rates.fresh_page_s * 1e3, False))
    compute = sum(ms for _, ms, _ in items)
    if not mem.offload.optimizer_host:  # else the host runs it (offload_items)
        items.append(("optimizer step (fused AdamW)",
                      plan.shard_numel * rates.optimizer_s * 1e3, False))
    if (mem.offload.optimizer_nvme or mem.offload.params_nvme) and disk is None:
        disk = disk_of(mem, config, ranks_here=plan.grid.world_size)
    items += offload_items(mem, plan, config, disk=disk)
    if config.clip_norm:
        items.append(("gradient norm (clipping)", plan.shard_numel * dtype.itemsize
                      / rates.rate("reduction", dtype) * 1e3, False))
    for c in collectives(plan, config) + tp_collectives(mem.graphs, plan, config):
        items.append((f"{c.what} ({c.nbytes / MIB:.1f} MiB x {c.count})",
                      collective_ms(c, device, shm=shm), c.overlapped and not device.gloo))
    serial = sum(ms for _, ms, ov in items if not ov)
    hidden = sum(ms for _, ms, ov in items if ov)
    # overlapped collectives cost only what the compute cannot cover
    return StepTime(items, device, serial + max(0.0, hidden - compute))
