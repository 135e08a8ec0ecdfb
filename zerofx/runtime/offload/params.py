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
    optimizer step         ``step_writer``: the fused kernels write the updated values of
                           chunk [a, b) of the shard into one of buffer_count chunk buffers
                           (``begin``), which goes to the file on a writer thread while the
                           next chunk is updated (``end``); a buffer is reused once its
                           write is done. The chunks are the optimizer state's when it is
                           on NVMe too (each chunk's values leave as its state streams),
                           else chunks of sub_group_size (step_chunks).
                           The persistent buckets' rows (the tail of the shard: stage 3
                           keeps those parameters whole, and the step all-gathers them) are
                           copied out into ``tail``, the step's only other 16-bit memory.
                           A skipped step writes nothing and reads only the tail.
    checkpoints, init      write_all / read_all

At the step, memory holds at most ``step_numel``: min(buffer_count, chunks) buffers of
the longest chunk and the tail, never the whole shard (the planner counts the same,
planner/offload.py; ``peak_step_bytes`` records it). Stage 3's step all-gathers only the
persistent buckets: the others are gathered by the graphs from the file when read.

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
import contextlib
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from zerofx.graph_ops import IdTable
from zerofx.runtime.offload.files import PARAMS, OffloadError, StateFile
from zerofx.runtime.offload.state import _segments, chunk_plan

# The stores by id, for the step graph's ops (offload/ops.py).
STORES = IdTable("offloaded parameters",
                 "the engine (its runtime) alive while its step graph runs")
lookup = STORES.lookup


class ParamStore:
    """This rank's compute-dtype shard of ``plan`` in a file (see the module doc)."""

    def __init__(self, plan, *, path: str, buffer_count: int, buffer_size: int,
                 max_in_cpu: int, block_size: int, chunks: list[tuple[int, int]]):
        self.plan, self.dtype = plan, plan.compute_dtype
        self.numel, self.item = plan.shard_numel, plan.compute_dtype.itemsize
        self.ranges = [(r.at, r.numel) for r in plan.owned()]  # bucket -> its shard range
        cap = gather_cap(plan)
        self.tail_at = tail_offset(plan)
        self.chunks = chunks  # the step's (step_chunks: the optimizer state's, if on NVMe)
        self.segments = [_segments(plan, a, b) for a, b in self.chunks]
        _check_fits(cap, self.numel, buffer_size=buffer_size, max_in_cpu=max_in_cpu,
                    step=step_numel(buffer_count, self.chunks, self.numel - self.tail_at))
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
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="zerofx-param-write")
        self.step_held = 0  # bytes of the step's chunk buffers now (none between steps)
        self.peak_step_bytes = 0  # the most the step held: chunk buffers and the tail
        self.chunks_written = 0
        self.id = STORES.add(self)
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    def memory_bytes(self) -> int:
        """Bytes held in memory now: the buffers of gathers in flight and reads ahead,
        the step's chunk buffers (none between steps)."""
        return self.step_held + sum(b.numel() * self.item for b in self.buffers
                                    if b is not None)

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

    # ---- the optimizer step (offload/ops.py) ----------------------------------------------
    @contextlib.contextmanager
    def step_writer(self, tail: torch.Tensor, chunks: list[tuple[int, int]]):
        """A StepWriter for an applied step visiting ``chunks`` in order; waits for every
        write on exit. A failure after a write started leaves the store broken."""
        self._check_readable()
        self._drop_ahead()
        w = StepWriter(self, tail, max((b - a for a, b in chunks), default=0),
                       min(len(self.buffers), len(chunks)))
        try:
            yield w
            w.finish()
        except BaseException as e:
            w.finish(raise_=False)
            if w.started:
                self.broken = f"a write failed part way ({type(e).__name__}: {e})"
            raise
        finally:
            self.step_held = 0
        self.chunks_written += len(chunks)

    def read_tail(self, tail: torch.Tensor) -> None:
        """A skipped step: the persistent rows, unchanged, for the step's all-gather."""
        self._check_readable()
        self.peak_step_bytes = max(self.peak_step_bytes, tail.numel() * self.item)
        if tail.numel():
            self.file.read_into(tail, self.tail_at * self.item)

    # ---- the whole shard (checkpoints, initialisation) ------------------------------------
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
        self._writer.shutdown(wait=True)
        self.file.close()
        self.buffers, self._free = [], []
        self.broken = "it was closed (engine.destroy / ZeroRuntime.close)"

    def _check_readable(self) -> None:
        if self.broken is not None:
            raise OffloadError(
                f"the offloaded parameters in {self.file.path} are not usable: {self.broken}."
                f" Nothing of them is read again; load the last checkpoint (it rewrites "
                f"them) or restart")


class StepWriter:
    """One applied step's 16-bit values into the file, chunk by chunk: ``begin(a, b)`` is
    where the kernels write chunk [a, b) of the shard, ``end(a, b)`` copies its persistent
    rows into ``tail`` and starts its write. ``count`` buffers of ``cap`` elements, each
    reused once its last write is done (with one, nothing overlaps)."""

    def __init__(self, store: ParamStore, tail: torch.Tensor, cap: int, count: int):
        self.store, self.tail, self.cap = store, tail, cap
        self.buffers: list[torch.Tensor | None] = [None] * max(count, 1)
        self.writes: list = [None] * len(self.buffers)
        self.k = 0  # chunks begun
        self.started = False  # a write to the file started
        store.peak_step_bytes = max(store.peak_step_bytes, tail.numel() * store.item)

    def begin(self, a: int, b: int) -> torch.Tensor:
        slot = self.k % len(self.buffers)
        self._wait(slot)
        if self.buffers[slot] is None:
            st = self.store
            self.buffers[slot] = torch.empty(self.cap, dtype=st.dtype)
            st.step_held += self.cap * st.item
            st.peak_step_bytes = max(st.peak_step_bytes,
                                     st.step_held + self.tail.numel() * st.item)
        return self.buffers[slot][:b - a]

    def end(self, a: int, b: int) -> None:
        st, slot = self.store, self.k % len(self.buffers)
        self.k += 1
        buf = self.buffers[slot][:b - a]
        lo = max(a, st.tail_at)
        if lo < b:  # persistent rows: the step's all-gather sends them
            self.tail[lo - st.tail_at:b - st.tail_at].copy_(buf[lo - a:])
        self.started = True
        self.writes[slot] = st._writer.submit(st.file.write_from, buf, a * st.item)

    def _wait(self, slot: int) -> None:
        w, self.writes[slot] = self.writes[slot], None
        if w is not None:
            w.result()  # raises the write's error

    def finish(self, raise_: bool = True) -> None:
        """Wait for every write (all of them, even after a failure); then drop the
        buffers."""
        first = None
        for slot in range(len(self.writes)):
            try:
                self._wait(slot)
            except BaseException as e:
                first = first or e
        self.buffers = []
        if first is not None and raise_:
            raise first


def tail_offset(plan) -> int:
    """Where the persistent buckets' rows begin in the shard (its end when there are
    none): they come last in the layout, so they are the shard's tail."""
    owned = plan.owned()
    return next((owned[b.index].at for b in plan.buckets if b.offset >= plan.persist_offset),
                plan.shard_numel)


def step_numel(buffer_count: int, chunks: list[tuple[int, int]], tail: int) -> int:
    """16-bit elements the step holds at most: the chunk buffers it uses and the tail."""
    cap = max((b - a for a, b in chunks), default=0)
    return min(buffer_count, len(chunks)) * cap + tail


def _check_fits(cap: int, numel: int, *, buffer_size: int, max_in_cpu: int,
                step: int) -> None:
    """What the config bounds and zerofx cannot go below: refused, naming the key."""
    if cap > buffer_size:
        raise OffloadError(
            f"zero_optimization.offload_param.buffer_size {buffer_size}: a bucket's shard "
            f"holds {cap} elements and is read whole into one buffer; raise buffer_size to "
            f"at least {cap} or lower stage3_prefetch_bucket_size (smaller buckets)")
    if step > max_in_cpu:
        raise OffloadError(
            f"zero_optimization.offload_param.max_in_cpu {max_in_cpu}: zerofx's optimizer "
            f"step holds {step} of this rank's {numel} 16-bit parameter elements in memory "
            f"(buffer_count chunk buffers and the persistent parameters' rows); raise "
            f"max_in_cpu to at least {step}, or lower zero_optimization.sub_group_size or "
            f"offload_param.buffer_count")


def gather_cap(plan) -> int:
    """Elements of the gathers' buffers: the largest gathered bucket's owned range."""
    owned = plan.owned()
    return max((owned[b.index].numel for b in plan.buckets if b.offset < plan.persist_offset),
               default=0)


def step_chunks(config, plan) -> list[tuple[int, int]]:
    """The chunks the step writes the shard in: sub_group_size elements, or
    offload.default_chunk's (a sixteenth of the shard within [2**20, 2**24]), as the
    optimizer state's stream cuts it; with that state on NVMe too, exactly its chunks
    (OffloadedState's plan: LAMB cut only where its sums allow)."""
    from zerofx.runtime.offload import default_chunk
    from zerofx.runtime.offload.state import _lamb_cuts

    zero, n = config.zero_optimization, plan.shard_numel
    cuts = None
    if zero.offload_optimizer.device == "nvme" and config.optimizer is not None \
            and config.optimizer.type == "Lamb":
        cuts = _lamb_cuts(plan, [s.offset for s in plan.params] + [plan.padded_numel])
    return chunk_plan(n, zero.sub_group_size or default_chunk(n), cuts)


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
                      block_size=aio.block_size, chunks=step_chunks(config, plan))
