"""HostOffload: ZeRO-Offload, this rank's fp32 master shard and moments in host memory.

With the parameters on a GPU and ``offload_optimizer.device: cpu``, the device keeps the
compute-dtype parameters and the gradient buffers; the fp32 master weights and the Adam/LAMB
moments (12 bytes per owned element, ZeRO's K) live in host tensors, page-locked with
``pin_memory`` so the copies below run asynchronously. Each applied step, for every owned
bucket range in shard order::

    side stream    copy gradient range i device -> host     (all ranges issued at once)
    this thread    wait for range i; zerofx's C++ fused Adam/LAMB on the host shard range,
                   writing the updated compute-dtype values into a host staging buffer
    side stream    copy that range host -> device, into the step's ``out``

so the host kernel of range i runs while range i+1 arrives and range i-1 leaves. The rest
of the step graph (gradient norm and its all-reduce, overflow check, clipping coefficient,
all-gathers, loss scale) runs on the device as in memory, on the same gradient tensor, so
overflow skips and clipping are the in-memory ones exactly; only the update's kernel calls
move (offload/ops.py's ops, which name this object by its id like an NVMe state). A skipped
step copies nothing. The kernels are called on the same ranges with the same arguments as
in memory (Adam is elementwise; LAMB's per-tensor sums are added in the same order), so on
CPU parameters, where the forcing switch below runs this path for tests, the training is
the in-memory training bit for bit; on a GPU it is the CPU kernel's rounding instead of the
CUDA kernel's (benchmarks/gpu_check.py --offload measures the difference).

The gradients are copied when the step starts, not as each bucket's reduction completes
during the backward: the step's norm is computed on the device meanwhile, but the copy is
not overlapped with the backward (docs/offload.md).

``ZEROFX_FORCE_HOST_OFFLOAD=1`` (config/deepspeed_keys.py; tests and gpu_check only) runs
this path on CPU parameters too: the "device" tensors and the host state are then distinct
CPU buffers and every copy happens (synchronously).
"""
from __future__ import annotations

import logging

import torch

from zerofx.config.deepspeed_keys import host_offload_forced
from zerofx.runtime.fused_optim import adam_step_, lamb_apply_, lamb_moments_
from zerofx.runtime.offload import state as _registry  # the ops' table of offloaded states
from zerofx.runtime.offload.files import OffloadError

log = logging.getLogger(__name__)

FIELDS = ("master", "exp_avg", "exp_avg_sq")


class HostOffload:
    """The optimizer state of ``plan``'s shard in host memory (see the module doc)."""

    def __init__(self, plan, *, kind: str, hyper, device: torch.device, pin_memory: bool):
        self.plan, self.kind, self.hyper = plan, kind, hyper
        self.numel = n = plan.shard_numel
        self.device = device
        # Page-locked memory needs a CUDA runtime; a CPU-only build has nothing to lock for.
        self.pinned = bool(pin_memory and device.type == "cuda" and torch.cuda.is_available())

        def host(dtype):
            return torch.zeros(n, dtype=dtype, pin_memory=self.pinned)
        self.state = {k: host(torch.float32) for k in FIELDS}
        self.grad = host(plan.grad_dtype)  # the gradient shard, as the device reduced it
        self.out = host(plan.compute_dtype)  # the updated compute-dtype shard, going back
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # (shard offset, elements, flat offset) of every owned bucket range, in shard order:
        # the in-memory step's LAMB calls, and the pipeline's units
        self.ranges = [(r.at, r.numel, r.start) for r in plan.owned()]
        self.bounds = torch.tensor([s.offset for s in plan.params] + [plan.padded_numel],
                                   dtype=torch.int64)
        self.copies = {"to_host": 0, "to_device": 0}  # bytes, for tests and the benchmark
        self.id = _registry.STATES.add(self)

    @property
    def host_master(self) -> torch.Tensor:
        """The fp32 master shard, for TrainState.allocate to fill from the parameters."""
        return self.state["master"]

    @property
    def num_tensors(self) -> int:
        return self.bounds.numel() - 1

    def memory_bytes(self) -> int:
        """Host bytes held: the fp32 state and the two staging buffers."""
        return sum(t.numel() * t.element_size()
                   for t in (*self.state.values(), self.grad, self.out))

    # ---- the optimizer step (through offload/ops.py's ops) -------------------------------
    def adam(self, g, out, *, lr, step, coef, skip, beta1, in_place: bool) -> None:
        """Fused Adam/AdamW on the host shard, range by range; ``out`` (on the device) takes
        the compute-dtype values (the flat parameters' rows when ``in_place``)."""
        if float(skip):  # the kernel would change nothing: nothing moves either
            return
        lr, step, coef, skip, beta1 = _host(lr, step, coef, skip, beta1)
        master, m, v = (self.state[k] for k in FIELDS)

        def kernel(a, b, flat):
            adam_step_(master[a:b], self.grad[a:b], m[a:b], v[a:b], lr=lr, step=step,
                       hyper=self.hyper, grad_scale=coef, skip=skip,
                       param_out=self.out[a:b], beta1=beta1)
        self._pipeline(kernel, g=g, out=out, in_place=in_place)

    def lamb_moments(self, g, *, coef, skip, beta1) -> torch.Tensor:
        """LAMB pass 1 on the host shard: new moments, the [2, T] partial sums (on g's
        device, for the all-reduce)."""
        if float(skip):
            return torch.zeros(2, self.num_tensors, dtype=torch.float32, device=g.device)
        coef, skip, beta1 = _host(coef, skip, beta1)
        master, m, v = (self.state[k] for k in FIELDS)
        sums = []

        def kernel(a, b, flat):
            sums.append(lamb_moments_(master[a:b], self.grad[a:b], m[a:b], v[a:b],
                                      self.bounds, hyper=self.hyper, grad_scale=coef,
                                      skip=skip, shard_offset=flat, beta1=beta1))
        self._pipeline(kernel, g=g)
        if not sums:  # this rank owns nothing
            return torch.zeros(2, self.num_tensors, dtype=torch.float32, device=g.device)
        return sum(sums).to(g.device)  # in shard order, as the in-memory step adds them

    def lamb_apply(self, ratio, out, *, lr, step, skip, beta1, in_place: bool) -> None:
        """LAMB pass 2 on the host shard: new master weights, and ``out`` on the device."""
        if float(skip):
            return
        ratio, lr, step, skip, beta1 = _host(ratio, lr, step, skip, beta1)
        master, m, v = (self.state[k] for k in FIELDS)

        def kernel(a, b, flat):
            lamb_apply_(master[a:b], m[a:b], v[a:b], self.bounds, ratio, lr=lr, step=step,
                        hyper=self.hyper, skip=skip, shard_offset=flat,
                        param_out=self.out[a:b], beta1=beta1)
        self._pipeline(kernel, out=out, in_place=in_place)

    def _pipeline(self, kernel, *, g=None, out=None, in_place: bool = False) -> None:
        """``kernel(a, b, flat)`` on every owned range [a, b) of the host shard in order,
        with ``g``'s range copied to the host before it and the host ``out`` range copied
        to the device ``out`` after it (see the module doc)."""
        side = self.stream
        arrived = [None] * len(self.ranges)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))  # g is computed
        if g is not None and side is not None:
            with torch.cuda.stream(side):
                for i, (a, n, _) in enumerate(self.ranges):
                    self.grad[a:a + n].copy_(g[a:a + n], non_blocking=True)
                    arrived[i] = torch.cuda.Event()
                    arrived[i].record(side)
        for i, (a, n, flat) in enumerate(self.ranges):
            if g is not None:
                self._copy(self.grad[a:a + n], g[a:a + n], arrived[i], "to_host")
            kernel(a, a + n, flat)
            if out is not None:
                dst = out[flat:flat + n] if in_place else out[a:a + n]
                self._copy(dst, self.out[a:a + n], None, "to_device")
        if side is not None:  # what reads ``out`` next (the all-gathers) waits for it
            torch.cuda.current_stream(self.device).wait_stream(side)

    def _copy(self, dst, src, arrived, direction: str) -> None:
        self.copies[direction] += src.numel() * src.element_size()
        if self.stream is None:  # CPU parameters (forced): a real copy between buffers
            dst.copy_(src)
        elif arrived is not None:  # device -> host, issued already: wait for it
            arrived.synchronize()
        else:
            with torch.cuda.stream(self.stream):
                # stream-ordered: the next step's write of this staging range comes after
                dst.copy_(src, non_blocking=True)

    # ---- the whole state (checkpoints, the optimizer's state_dict, initialisation) --------
    def read_all(self) -> dict[str, torch.Tensor]:
        """The three fields: the host tensors themselves, as in memory."""
        self._settle()
        return dict(self.state)

    def write_all(self, whole: dict) -> None:
        """Replace the state by ``whole`` (field -> shard-sized tensor on any device; a
        missing or None field is zeros)."""
        self._settle()
        for k in FIELDS:
            src = whole.get(k)
            if src is None:
                self.state[k].zero_()
            elif src is not self.state[k]:
                self.state[k].copy_(src)

    def close(self) -> None:
        """Free the host memory (engine.destroy, ZeroRuntime.close)."""
        self._settle()
        empty = torch.empty(0)
        self.state = {k: empty for k in FIELDS}
        self.grad = self.out = empty
        self.ranges = []

    def _settle(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _host(*tensors):
    """The step's scalars on the host, for the CPU kernels (a device read: the host step
    needs them, as it needs the overflow flag)."""
    return [t.to("cpu") for t in tensors]


def open_host_offload(config, plan, spec, device: torch.device) -> HostOffload | None:
    """The host state ``offload_optimizer.device: cpu`` asks for: parameters on a GPU (or
    the forcing switch); None on CPU parameters, where the state is in host memory already."""
    off = config.zero_optimization.offload_optimizer
    if device.type == "cpu" and not host_offload_forced():
        log.info("offload_optimizer device 'cpu' with parameters on the CPU: the optimizer "
                 "state is in host memory already")
        return None
    if spec.kind == "torch":
        raise OffloadError(
            "offload_optimizer device 'cpu' runs zerofx's fused Adam, AdamW or Lamb on the "
            "host shard; a torch optimizer object cannot be moved there: configure the "
            "optimizer in the config's \"optimizer\" block instead of passing one")
    return HostOffload(plan, kind=spec.kind, hyper=spec.hyper, device=device,
                       pin_memory=off.pin_memory)
