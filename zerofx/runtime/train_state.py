"""TrainState: the tensors one runtime trains with, laid out by the plan.

Buffers (N = data-parallel size, "shard" = what this rank updates, see plan.owned):
    flat_params   padded_numel, compute dtype: the model's parameters are views into it
                  (stage 3: only the persistent parameters' buckets; the others are
                  gathered from shard_lowp by the graphs, runtime/param_gather.py)
    master, exp_avg, exp_avg_sq   shard, fp32 (offloaded: empty here, the state is in
                  ``offload``'s file (NVMe) or host memory (cpu, parameters on a GPU);
                  read and write it through ``optimizer_state``)
    shard_lowp    shard, compute dtype: stage 3's parameters (stages 1-2: a step temporary)
                  (offload_param nvme: empty, in ``params``' file, offload/params.py;
                  change it through ``set_param_shard`` / ``param_shard``)
    shard_grads   shard, compute dtype: reduce-scatter target (stage 2)
    full_grads    padded_numel: all-reduce target (stages 0/1) and the local accumulation
                  buffer when gradient_accumulation_steps > 1 (stage 2 keeps it only then)
and the step's counters on the device (step, skipped, grad_norm, lr, beta1, the fp16 loss
scaler's state). ``step_inputs`` hands them to the optimizer-step graph by name (StepState).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from zerofx.plan import Plan
from zerofx.runtime.loss_scaler import LossScaler
from zerofx.runtime.offload import OffloadedState
from zerofx.runtime.offload.params import ParamStore
from zerofx.runtime.step_fn import StepState


@dataclass
class TrainState:
    """The runtime's buffers, optimizer state and step counters (see the module doc)."""

    flat_params: torch.Tensor
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    shard_lowp: torch.Tensor
    shard_grads: torch.Tensor
    full_grads: torch.Tensor | None
    scaler: LossScaler
    step_count: torch.Tensor
    skipped: torch.Tensor
    grad_norm: torch.Tensor
    lr: torch.Tensor
    beta1: torch.Tensor
    # the fp32 state on disk (offload_optimizer nvme) or in host memory (cpu: a HostOffload,
    # offload/host.py, with the same methods)
    offload: OffloadedState | None = None
    params: ParamStore | None = None  # stage 3's 16-bit shard on disk (offload_param nvme)

    @classmethod
    def allocate(cls, plan: Plan, device, *, scaler: LossScaler, lr: float, beta1: float,
                 gas: int, offload: OffloadedState | None = None,
                 params: ParamStore | None = None) -> "TrainState":
        """Zeroed buffers for ``plan``; the parameters are moved in afterwards
        (ParamCarriers.install fills flat_params, and the master through ``fill_shard``).
        With an NVMe ``offload`` neither the moments nor the master are ever whole in
        memory (``fill_shard`` writes the master to the file chunk by chunk; a host
        offload's master is its own host tensor from the start)."""
        low, dev = plan.compute_dtype, device
        # Stage 3 keeps only the persistent parameters whole: flat_params then covers
        # [persist_offset, padded_numel) of the layout (all of it below stage 3).
        flat_params = torch.zeros(plan.padded_numel - plan.persist_offset, dtype=low, device=dev)
        # A host offload's own fp32 master takes the parameters directly: the device never
        # holds the fp32 shard, not even while it is filled
        master = getattr(offload, "host_master", None)
        if master is None and offload is not None:  # NVMe: filled into the file by chunks
            master = torch.empty(0, dtype=torch.float32, device=dev)
        elif master is None:
            master = torch.zeros(plan.shard_numel, dtype=torch.float32, device=dev)
        # Stage 3's parameters between uses; below it the step makes a temporary.
        # (offload_param nvme: in ``params``' file, read bucket by bucket; empty here)
        shard_lowp = torch.zeros(plan.shard_numel, dtype=low, device=dev) \
            if plan.partitioned and params is None else torch.empty(0, dtype=low, device=dev)
        # Stage 2 with reduce-scatter and no accumulation never holds the full gradients.
        needs_full = not plan.reduces_into_shard or gas > 1
        grad = plan.grad_dtype  # the compute dtype, or fp32 (data_types.grad_accum_dtype)
        full_grads = torch.zeros(plan.padded_numel, dtype=grad, device=dev) if needs_full \
            else None
        if plan.reduces_into_shard:  # the reduce-scatter's target (stage 1 slices in the step)
            shard_grads = torch.zeros(plan.shard_numel, dtype=grad, device=dev)
        else:
            shard_grads = torch.empty(0, dtype=grad, device=dev) if plan.sharded else full_grads
        def moment():  # offloaded: in the file or host memory only (zeros there)
            return flat_params.new_empty(0, dtype=torch.float32) if offload is not None \
                else torch.zeros_like(master)
        return cls(
            flat_params=flat_params, master=master, exp_avg=moment(),
            exp_avg_sq=moment(), shard_lowp=shard_lowp, offload=offload, params=params,
            shard_grads=shard_grads, full_grads=full_grads, scaler=scaler,
            step_count=torch.zeros((), dtype=torch.float32, device=dev),
            skipped=torch.zeros((), dtype=torch.int64, device=dev),
            grad_norm=torch.full((), float("nan"), dtype=torch.float32, device=dev),
            lr=torch.tensor(lr, dtype=torch.float32, device=dev),
            # float64: the kernels compute with beta1 in double, as torch.optim.Adam does
            beta1=torch.tensor(beta1, dtype=torch.float64, device=dev))

    def fill_shard(self, fill) -> None:
        """The master weights from ``fill(a, b, out)`` (writes shard elements [a, b) of the
        fp32 master into ``out``), and stage 3's compute-dtype shard from them. NVMe
        offload: chunk by chunk into the file (moments zero beside them), each chunk's
        compute-dtype values straight to the shard or its file: no shard-sized temporary."""
        if not self._on_nvme():
            fill(0, self.master.numel(), self.master)
            self.master_filled()
            return

        def chunk(a, b, master):
            fill(a, b, master)
            if self.params is not None:  # at startup: no read ahead to drop (write_all)
                p = self.params
                p.file.write_from(master.to(p.dtype), a * p.item)
            elif self.shard_lowp.numel():
                self.shard_lowp[a:b].copy_(master)
        self.offload.fill(chunk)

    def master_filled(self) -> None:
        """The master weights hold the parameters: stage 3's compute-dtype shard follows
        (offloaded: they go to the file, zero moments beside them, and leave memory)."""
        if self.shard_lowp.numel() or self.params is not None:
            self.set_param_shard(self.master)
        if self.offload is not None:
            self.offload.write_all({"master": self.master})
            self.master = self.flat_params.new_empty(0, dtype=torch.float32)

    @contextlib.contextmanager
    def optimizer_state(self, mode: str = "read"):
        """The fp32 shard state as {"master", "exp_avg", "exp_avg_sq"}: the tensors
        themselves in memory; offloaded, shard-sized copies read from the file ("read",
        "update") or to be filled completely by the caller ("write"), written back on a
        clean exit ("write", "update"). Checkpoints and the optimizer's state_dict read
        and restore the state only through this."""
        if mode not in ("read", "write", "update"):
            raise ValueError(f"mode {mode!r}: one of 'read', 'write', 'update'")
        if self.offload is None:
            yield {"master": self.master, "exp_avg": self.exp_avg,
                   "exp_avg_sq": self.exp_avg_sq}
            return
        if not self._on_nvme():  # host memory (device cpu): the host tensors themselves
            state = self.offload.read_all() if mode != "write" else {
                k: torch.zeros(self.offload.numel, dtype=torch.float32)
                for k in ("master", "exp_avg", "exp_avg_sq")}
        else:  # NVMe: file-backed copies beside the state, so it need not fit in memory
            state = self.offload.staged()
            if mode != "write":
                self.offload.read_all(into=state)
        yield state
        if mode != "read":
            self.offload.write_all(state)

    def staging(self):
        """``alloc(numel)`` of zero fp32 tensors for whole copies of the state a load needs:
        with the state on NVMe, file-backed beside it (offload/scratch.py); None (in memory)
        otherwise."""
        if not self._on_nvme():
            return None
        return lambda n: self.offload.staged({"t": n})["t"]

    def _on_nvme(self) -> bool:
        """The optimizer state is in an NVMe file (not in memory, nor host tensors)."""
        return self.offload is not None and \
            getattr(self.offload, "host_master", None) is None

    def set_param_shard(self, values: torch.Tensor) -> None:
        """Stage 3: the compute-dtype shard becomes ``values`` (fp32 master weights or
        compute-dtype values, shard-sized), in memory or in ``params``' file."""
        if self.params is not None:
            self.params.write_all(values)
        else:
            self.shard_lowp.copy_(values)

    @contextlib.contextmanager
    def param_shard(self):
        """Stage 3's compute-dtype shard to change in place: the tensor itself in memory;
        offloaded, a copy read from the file and written back on a clean exit."""
        if self.params is None:
            yield self.shard_lowp
            return
        shard = self.params.read_all()
        yield shard
        self.params.write_all(shard)

    def close(self) -> None:
        """Free what outlives the Python objects: the offloaded state's files."""
        if self.offload is not None:
            self.offload.close()
        if self.params is not None:
            self.params.close()

    def step_inputs(self) -> StepState:
        """The tensors the optimizer-step graph reads and updates, by name."""
        s = self.scaler
        full = self.full_grads if self.full_grads is not None else self.shard_grads
        return StepState(
            shard_grads=self.shard_grads, full_grads=full, master=self.master,
            exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq, shard_lowp=self.shard_lowp,
            flat_params=self.flat_params, lr=self.lr, step=self.step_count, scale=s.scale,
            hysteresis=s.hysteresis, it=s.iter, last_overflow=s.last_overflow_iter,
            skipped=self.skipped, beta1=self.beta1, floor_hits=s.floor_hits,
            grad_norm=self.grad_norm)

    def bytes(self) -> int:
        """Bytes of training state held: parameters, gradients, optimizer state."""
        buffers = self.offload.memory_bytes() if self.offload is not None else 0
        buffers += self.params.memory_bytes() if self.params is not None else 0
        return buffers + nbytes(self.flat_params, self.master, self.exp_avg, self.exp_avg_sq,
                                self.shard_lowp, self.shard_grads, self.full_grads)

    def bucket_view(self, plan: Plan, bucket: int) -> torch.Tensor:
        """Bucket ``bucket``'s range of the flat parameters (stage 3: persistent ones only)."""
        b, base = plan.buckets[bucket], plan.persist_offset
        return self.flat_params[b.offset - base:b.offset - base + b.padded]

    def local_param(self, plan: Plan, name: str) -> torch.Tensor:
        """This rank's piece of parameter ``name``: a view of the flat compute-dtype buffer."""
        s = plan.slot(name)
        return self.flat_params[s.offset:s.end].view(s.shape)


def nbytes(*tensors) -> int:
    """Bytes of ``tensors``, each buffer once (shard_grads is full_grads below stage 2;
    by identity, which also holds on the meta device, where every address is 0)."""
    unique = {id(t): t for t in tensors if t is not None}
    return sum(t.numel() * t.element_size() for t in unique.values())
