"""Per-rank bytes of a planned job, by kind, and when they are alive together.

    model states     the flat buffers exactly as TrainState allocates them for the plan
                     (the same code, on the meta device): parameters in the compute dtype
                     (stage 3: this rank's shard plus the persistent buckets), gradients
                     (the all-reduce / accumulation buffer and the reduce-scatter shard),
                     the optimizer state (fp32 master, exp_avg, exp_avg_sq)
    comm buffers     the shared-memory mirrors of the ``shm`` collective form
                     (runtime/comm/forms.shm_mirrors), where the job may take it: ranks of a
                     CPU (gloo) job on one host, the form pinned or "fastest" (the runtime
                     times the forms at startup; the plan counts the mirror it may map)
    activations      saved for the backward, each forward graph's (planner/graphs.py)
    working          the forward's and backward's own temporaries at the activation peak:
                     the peak over the micro-step's graphs run in order, each with the
                     saved values of the graphs before it alive, minus all saved values
    gathered         ZeRO-3's whole parameters alive at once: at most
                     stage3_max_live_parameters elements, at least the largest bucket a
                     graph reads whole; with offload_param nvme also its read buffers
                     (planner/offload.py), held while the gathers run
    step temporary   stage 1 copies this rank's gradients out of the full buffer; stages
                     1-2 build the updated compute-dtype shard before gathering it (unless
                     the gather form is pinned to one that writes in place); stages 2-3
                     without accumulation stage each bucket's gradients whole until its
                     reduce-scatter is done, at most STAGED_IN_FLIGHT buckets in flight
                     and one filling. The optimizer step runs after the backward, when no
                     activation is left (the staged buckets live during the backward: at
                     its peak, early, they are not counted). offload_param nvme: the
                     step reads this rank's whole compute-dtype shard from its file
    offload          (planner/offload.py) offload_optimizer nvme: the optimizer states row
                     holds the chunk buffers, the state is in the file; cpu with a GPU: the
                     state is in host memory (the ``host`` row), not on the device;
                     offload_param nvme: the parameters row lacks the shard, in its file.
                     ``nvme``: the bytes of this rank's files (on disk, not in memory)

    compiled         the resident bytes of the compiled graphs themselves (not tensors):
                     Dynamo's and AOTAutograd's graphs, their nodes' fake values, guards,
                     the generated code, and the heap they leave behind; they grow with
                     the graphs' nodes, so with depth, not width (``compiled_bytes``). In
                     host memory: in the peak of a CPU job, a row of its own on a GPU

    peak = model states + comm buffers + compiled (CPU) +
           max(activations + working + gathered, step temporary)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zerofx.config import Config
from zerofx.plan import Plan, gather_chunks
from zerofx.planner.offload import OffloadFacts, StandIn
from zerofx.runtime.grad_intake import STAGED_IN_FLIGHT
from zerofx.runtime.loss_scaler import LossScaler
from zerofx.runtime.train_state import TrainState, nbytes

_FLAG_ALIGN = 64  # the shm mirror's flags: 2 int64 per rank per key, 64-byte aligned


@dataclass
class RankMemory:
    """Bytes one rank holds, by kind (see the module doc)."""

    parameters: int
    gradients: int
    optimizer: int
    step_temporary: int
    activations: int
    gathered: int
    working: int = 0
    comm_buffers: int = 0
    compiled: int = 0
    compiled_on_host: bool = False  # a GPU job: the compiled graphs are not device memory
    graphs: list = field(default_factory=list)  # planner.graphs.GraphFacts per traced pair
    offload: OffloadFacts = field(default_factory=OffloadFacts)

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def host(self) -> int:
        """Host memory a GPU rank's offloaded optimizer state takes (not in ``peak``)."""
        return self.offload.host

    @property
    def nvme(self) -> int:
        """Bytes of this rank's offload files (not in ``peak``)."""
        return self.offload.nvme

    @property
    def peak(self) -> int:
        compiled = 0 if self.compiled_on_host else self.compiled
        return self.model_states + self.comm_buffers + compiled + max(
            self.activations + self.working + self.gathered, self.step_temporary)

    def rows(self) -> list[tuple[str, int]]:
        off = self.offload
        opt = "optimizer states" + (" (NVMe chunk buffers)" if off.optimizer_nvme else
                                    " (on the host)" if off.optimizer_host else "")
        rows = [("parameters" + (" (shard on NVMe)" if off.params_nvme else ""),
                 self.parameters), ("gradients", self.gradients), (opt, self.optimizer),
                ("communication buffers", self.comm_buffers),
                ("compiled graphs (host objects" + (", not on the device)"
                                                    if self.compiled_on_host else ")"),
                 self.compiled),
                ("activations saved for backward", self.activations),
                ("forward/backward working tensors", self.working),
                ("ZeRO-3 gathered parameters" + (" + NVMe read buffers" if off.params_nvme
                                                 else ""), self.gathered),
                ("step temporary (after the backward)", self.step_temporary),
                ("peak", self.peak)]
        if off.optimizer_host:
            rows.append(("host memory (offloaded optimizer, not on the device)", self.host))
        if self.nvme:
            rows.append(("on NVMe (files, not in memory)", self.nvme))
        return rows


def model_states(plan: Plan, config: Config,
                 offload: OffloadFacts = OffloadFacts()) -> dict[str, int]:
    """Parameter, gradient, optimizer and step-temporary bytes of TrainState for ``plan``,
    as held in memory (on the device) with ``offload`` (planner/offload.py)."""
    meta = torch.device("meta")
    opt = None
    if offload.optimizer_host:  # its master is a host tensor: not the device's
        opt = StandIn(torch.empty(plan.shard_numel, dtype=torch.float32, device=meta))
    elif offload.optimizer_nvme:
        opt = StandIn()
    st = TrainState.allocate(plan, meta, scaler=LossScaler.from_config(config.fp16,
                                                                       device=meta),
                             lr=0.0, beta1=0.0,
                             gas=config.accumulation_steps(plan.grid.dp_size), offload=opt,
                             params=StandIn() if offload.params_nvme else None)
    # TrainState.master_filled: an offloaded master leaves memory once it is in the file
    # (or is the host offload's own tensor)
    master = st.master if opt is None else None
    shard = plan.shard_numel * plan.compute_dtype.itemsize
    temp = 0
    if plan.sharded and not plan.partitioned:
        # runtime/step_fn.py: stage 1 gathers this rank's gradients out of the full buffer;
        # the updated compute-dtype shard is a temporary unless the gather form writes in
        # place (p2p, shm: pinned; "fastest" may choose either, so it is counted)
        temp += shard if not plan.reduces_into_shard else 0
        temp += shard if config.zerofx.gather_form not in ("p2p", "shm") else 0
    if plan.reduces_into_shard and st.full_grads is None:
        # runtime/grad_intake.py: each bucket's gradients are staged whole until its
        # reduce-scatter is done; STAGED_IN_FLIGHT of them in flight, and the next filling
        largest = max(b.padded for b in plan.buckets)
        staged = min(plan.padded_numel, (STAGED_IN_FLIGHT + 1) * largest)
        temp += staged * plan.grad_dtype.itemsize
    temp += offload.param_step  # offload_param: the step's chunk buffers, persistent rows
    return {"parameters": nbytes(st.flat_params, st.shard_lowp),
            "gradients": nbytes(st.full_grads, st.shard_grads),
            "optimizer": nbytes(master, st.exp_avg, st.exp_avg_sq) + offload.optimizer_buffers,
            "step_temporary": temp}


def gathered_bytes(plan: Plan, config: Config,
                   offload: OffloadFacts = OffloadFacts()) -> int:
    """ZeRO-3's gathered parameters alive at once, and offload_param's read buffers."""
    if not plan.partitioned:
        return 0
    largest = max((b.padded for b in plan.buckets if b.offset < plan.persist_offset),
                  default=0)
    live = max(largest, min(config.zero_optimization.stage3_max_live_parameters,
                            plan.persist_offset))
    return live * plan.compute_dtype.itemsize + offload.param_buffers


def comm_buffers(plan: Plan, config: Config, *, shm: bool) -> int:
    """Bytes of the shm mirrors the runtime may map (module doc); ``shm``: the data-parallel
    ranks are on one host of a CPU job, where the form is offered."""
    dp = plan.grid.dp_size
    if not shm or dp < 2 or not plan.sharded:
        return 0
    pinned = {"reduce": config.zerofx.reduce_form, "gather": config.zerofx.gather_form}
    nb = len(plan.buckets)
    # role -> (elements, keys), as runtime/comm/forms.shm_mirrors lays them out
    roles = {}
    if plan.reduces_into_shard and dp == 2:  # the shm reduce sums pairwise: 2 ranks only
        roles["reduce"] = (plan.padded_numel, nb)
    chunks = gather_chunks(plan, config)
    if chunks:
        roles["gather"] = (plan.padded_numel - plan.persist_offset, len(chunks))
    if plan.partitioned and plan.persist_offset:
        roles["param_gather"] = (plan.persist_offset, nb)
    total = 0
    for role, (numel, keys) in roles.items():
        if pinned["reduce" if role == "reduce" else "gather"] in ("shm", "fastest"):
            flags = -(-2 * dp * keys * 8 // _FLAG_ALIGN) * _FLAG_ALIGN
            total += flags + numel * plan.compute_dtype.itemsize
    return total


# The compiled graphs' resident bytes: a fixed part and bytes per node of the traced forward
# and backward graphs (module doc). Calibrated, not counted: neither tracemalloc (1.4 MiB of
# Python objects per GPT-2 layer) nor a tensor walk sees the C++ half (fake tensors' impls,
# guard trees) nor malloc's own pages, so the measure is the resident set. Least squares on
# a phase's peak RSS minus the tensors alive then (benchmarks/bench_plan_vs_measured.py
# --layers 1 6 --hidden 128 --case "stage 2", 2 ranks, this host, torch 2.13: 289 to 1409
# nodes, 32-55 MiB, residuals within 4.2 MiB), outside the sweep the planner is validated
# on (widths 256 and 512, 2 to 12 layers). Width does not change it (8 layers at widths
# 128, 256, 512: 84-86 MiB held beyond the tensors); the fixed part is the non-tensor heap
# a phase adds (the warm-up's is in the baseline).
COMPILED_BYTES_PER_NODE = 18 << 10
COMPILED_FIXED_BYTES = 28 << 20


def compiled_bytes(graphs) -> int:
    """Resident bytes of the compiled graphs of one micro-step (module doc)."""
    nodes = sum(g.nodes for g in graphs)
    return COMPILED_FIXED_BYTES + COMPILED_BYTES_PER_NODE * nodes if nodes else 0


def activation_peak(graphs) -> tuple[int, int]:
    """(saved, working) of the micro-step's graphs run in order: forwards first, then the
    backwards in reverse, each with the saved values of the graphs before it alive."""
    saved = sum(g.saved for g in graphs)
    before, peak = 0, saved
    for g in graphs:
        peak = max(peak, before + g.fw_peak, before + g.bw_peak)
        before += g.saved
    return saved, peak - saved
