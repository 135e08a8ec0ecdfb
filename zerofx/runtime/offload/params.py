"""ParamStore: stage 3's 16-bit parameter shard in a file between uses (offload_param nvme).

In memory, stage 3 keeps this rank's compute-dtype shard (``TrainState.shard_lowp``) for the
whole run: the all-gathers start from it and the optimizer step rewrites it. Offloaded, the
shard lives in one private file (offload/files.py, the optimizer state's rules) and memory
holds at most ``buffer_count`` bucket-sized buffers, and only while gathers use them:

    gather of bucket i     take(i): its owned range read into a free buffer (or the read
                           started ahead is waited for), then the read of the bucket that
                           followed i last step starts into another free buffer; the buffer
                           is the all-gather's source until the gather is waited for
                           (release)
    optimizer step         zerofx.offload_params_read: the whole shard as a step temporary,
                           updated by the fused kernels, zerofx.offload_params_write: back
                           to the file (nothing is written on a skipped step)
    checkpoints, init      write_all / read_all

Which buckets are gathered, in which order, is the graphs' choice and the same every step
(runtime/param_gather.py), so the order recorded in one step predicts the next one's; a
bucket the prediction misses is read when it is asked for. A write to the file (the step,
a checkpoint load) first drops every read started ahead: none may hand out old values.

A failure while the file is written leaves some buckets updated and others not: the store
is then marked broken and never read again until ``write_all`` completes (load_checkpoint),
as the optimizer state's file is (offload/state.py).
"""
from __future__ import annotations

import atexit
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from zerofx.graph_ops import IdTable
from zerofx.runtime.offload.files import PARAMS, OffloadError, StateFile

# The stores by id, for the step graph's ops (offload/ops.py).
STORES = IdTable("offloaded parameters",
                 "the engine (its runtime) alive while its step graph runs")
lookup = STORES.lookup


class ParamStore:
    """This rank's compute-dtype shard of ``plan`` in a file (see the module doc)."""

    def __init__(self, plan, *, path: str, buffer_count: int, buffer_size: int,
                 max_in_cpu: int, block_size: int):
        self.plan, self.dtype = plan, plan.compute_dtype
        self.numel, self.item = plan.shard_numel, plan.compute_dtype.itemsize
        self.ranges = [(r.at, r.numel) for r in plan.owned()]  # bucket -> its shard range
        gathered = [self.ranges[b.index][1] for b in plan.buckets
                    if b.offset < plan.persist_offset]
        cap = max(gathered, default=0)
        _check_fits(cap, self.numel, buffer_size=buffer_size, max_in_cpu=max_in_cpu)
        self.file = StateFile.create(path, self.numel * self.item, rank=plan.rank,
                                     block_size=block_size, role=PARAMS)
        self.cap = cap
        # made for each read, dropped at release: between uses (the step, the time between
        # steps) no buffer is held; at most buffer_count at a time, each one bucket's shard
        self.buffers: list[torch.Tensor | None] = [None] * buffer_count
        self._free = list(range(buffer_count))[::-1]
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="zerofx-param-read")
        self._ahead: dict[int, tuple[int, object]] = {}  # bucket -> (buffer, read future)
        self._last: list[int] = []  # buckets taken in the last step, in order
        self._order: list[int] = []  # and in this one
        self._on_track = True  # this step's order so far is the last one's
        self._order_cap = 64 * len(plan.buckets)  # a step gathers each bucket a few times
        self.broken: str | None = None
        self.bucket_reads = 0  # counters, for tests and the benchmark
        self.read_ahead_hits = 0
        self.peak_buffers = 0  # the most buffers held at once
        self.id = STORES.add(self)
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    def memory_bytes(self) -> int:
        """Bytes held in memory now: the buffers of gathers in flight and reads ahead
        (none between steps)."""
        return sum(b.numel() * self.item for b in self.buffers if b is not None)

    # ---- the gathers (runtime/param_gather.py) -------------------------------------------
    def take(self, i: int, make_room) -> tuple[torch.Tensor, int]:
        """Bucket ``i``'s owned range of the shard, in a buffer the caller holds until it
        calls ``release(buffer)``. ``make_room()`` must release a buffer (wait for a
        gather) when none is free."""
        self._check_readable()
        at, n = self.ranges[i]
        ahead = self._ahead.pop(i, None)
        if ahead is not None:
            slot, future = ahead
            try:
                future.result()
            except BaseException:
                self.release(slot)
                raise
            self.read_ahead_hits += 1
        else:
            slot = self._slot(make_room)
            try:
                self.file.read_into(self._buffer(slot, n), at * self.item)
            except BaseException:
                self.release(slot)
                raise
        self.bucket_reads += 1
        k = len(self._order)
        if k < self._order_cap:
            self._on_track = self._on_track and k < len(self._last) and self._last[k] == i
            self._order.append(i)
            self._read_next(k + 1)
        else:  # many calls without a step (an eval loop): stop recording and guessing
            self._on_track = False
        return self.buffers[slot], slot

    def release(self, slot: int) -> None:
        self.buffers[slot] = None
        self._free.append(slot)

    def _slot(self, make_room) -> int:
        while not self._free:
            if self._ahead:  # a guess loses to a bucket asked for now
                self._drop(next(iter(self._ahead)))
            else:
                make_room()
        return self._free.pop()

    def _buffer(self, slot: int, n: int) -> torch.Tensor:
        self.buffers[slot] = torch.empty(n, dtype=self.dtype)
        self.peak_buffers = max(self.peak_buffers, sum(b is not None for b in self.buffers))
        return self.buffers[slot]

    def _read_next(self, k: int) -> None:
        """Start reading the bucket that came k-th last step, if the steps agree so far and
        a buffer is free (never waits)."""
        if not self._on_track or k >= len(self._last) or not self._free:
            return
        nxt = self._last[k]
        if nxt in self._ahead:
            return
        at, n = self.ranges[nxt]
        slot = self._free.pop()
        self._ahead[nxt] = (slot, self._reader.submit(
            self.file.read_into, self._buffer(slot, n), at * self.item))

    def _drop(self, i: int) -> None:
        slot, future = self._ahead.pop(i)
        try:
            future.result()
        finally:
            self.release(slot)

    def end_step(self) -> None:
        """The step is about to rewrite the shard: reads started ahead are dropped (they
        would be old values), and this step's order predicts the next one's."""
        self._drop_ahead()
        self._last, self._order, self._on_track = self._order, [], True

    def _drop_ahead(self) -> None:
        for i in list(self._ahead):
            self._drop(i)

    # ---- the whole shard (the step, checkpoints, initialisation) --------------------------
    def read_all(self) -> torch.Tensor:
        """The shard read from the file, a fresh tensor."""
        self._check_readable()
        out = torch.empty(self.numel, dtype=self.dtype)
        self.file.read_into(out, 0)
        return out

    def write_all(self, shard: torch.Tensor) -> None:
        """Replace the shard by ``shard`` (cast to the compute dtype). Repairs a broken
        store when it completes."""
        self._drop_ahead()
        src = shard.detach().to(self.dtype).contiguous()
        try:
            self.file.write_from(src, 0)
        except BaseException as e:
            self.broken = f"a write failed part way ({type(e).__name__}: {e})"
            raise
        self.broken = None

    def close(self) -> None:
        """Free the disk space and the buffers (engine.destroy, ZeroRuntime.close, exit)."""
        if self.file.fd < 0:
            return
        self._drop_ahead()
        self._reader.shutdown(wait=True)
        self.file.close()
        self.buffers, self._free = [], []
        self.broken = "it was closed (engine.destroy / ZeroRuntime.close)"

    def _check_readable(self) -> None:
        if self.broken is not None:
            raise OffloadError(
                f"the offloaded parameters in {self.file.path} are not usable: {self.broken}."
                f" Nothing of them is read again; load the last checkpoint (it rewrites "
                f"them) or restart")


def _check_fits(cap: int, numel: int, *, buffer_size: int, max_in_cpu: int) -> None:
    """What the config bounds and zerofx cannot go below: refused, naming the key."""
    if cap > buffer_size:
        raise OffloadError(
            f"zero_optimization.offload_param.buffer_size {buffer_size}: a bucket's shard "
            f"holds {cap} elements and is read whole into one buffer; raise buffer_size to "
            f"at least {cap} or lower stage3_prefetch_bucket_size (smaller buckets)")
    if numel > max_in_cpu:
        raise OffloadError(
            f"zero_optimization.offload_param.max_in_cpu {max_in_cpu}: zerofx's optimizer "
            f"step reads this rank's whole 16-bit shard ({numel} elements) into memory (a "
            f"step temporary; streaming it by chunk is not built); raise max_in_cpu to at "
            f"least {numel} or use more data-parallel ranks")


def open_params(config, plan, device) -> ParamStore | None:
    """The offloaded parameters the config asks for (None: the shard stays in memory)."""
    from zerofx.config.blocks import AioConfig

    off = config.zero_optimization.offload_param
    if off.device != "nvme":
        return None
    if device.type != "cpu":
        raise OffloadError(
            f"offload_param device 'nvme' with parameters on {device}: zerofx reads the "
            f"offloaded shard on CPU-only runs (the GPU path is not built yet); drop the "
            f"offload or train on the CPU")
    if not plan.partitioned:
        from zerofx.config import ConfigError

        raise ConfigError(
            "config key 'zero_optimization.offload_param.device' is 'nvme' with one "
            "data-parallel rank: zerofx's stage 3 partitions the parameters across 2 or more "
            "data-parallel ranks and keeps them whole (in memory, as the model's own "
            "tensors) at one, so there is no shard to offload; drop offload_param or train "
            "on 2 or more data-parallel ranks", key="zero_optimization.offload_param.device")
    aio = config.aio or AioConfig()
    return ParamStore(plan, path=off.nvme_path, buffer_count=off.buffer_count,
                      buffer_size=off.buffer_size, max_in_cpu=off.max_in_cpu,
                      block_size=aio.block_size)
