"""OffloadedState: this rank's fp32 master shard and optimizer moments, in a file on disk.

What an in-memory run keeps as three shard-sized fp32 tensors (TrainState.master, exp_avg,
exp_avg_sq) lives in one private file (offload/files.py) and is streamed through a few
chunk-sized buffers (offload/stream.py) by each optimizer step: the fused Adam/LAMB kernels
run on each chunk as they run on the whole shard in memory, and give the same bits:

- Adam/AdamW is elementwise: any cut of the shard computes the same values.
- LAMB's first pass returns per-tensor partial sums in float32, each the rounding of a
  double sum over the kernel's pieces of one call. A chunk therefore never cuts a tensor's
  part of an owned range (it is cut only where an owned range or a tensor begins), so each
  sum is the one the in-memory call computes, and the chunks' sums add up in the in-memory
  order (the extra terms are exact zeros). A tensor piece longer than the chunk size makes
  a longer chunk.
- A skipped (overflow) step changes nothing in memory; here it reads and writes nothing.

A failure while the file is written (a full disk, an I/O error, an interrupt) leaves parts
of the state updated and parts not: the state is then marked broken and never read again
(every later use raises, naming the first failure); writing the whole state anew
(load_checkpoint) repairs it.
"""
from __future__ import annotations

import atexit
import bisect
import logging
import time
import weakref

import torch

from zerofx.graph_ops import IdTable
from zerofx.runtime.fused_optim import adam_step_, lamb_apply_, lamb_moments_
from zerofx.runtime.offload.files import OffloadError, StateFile
from zerofx.runtime.offload.scratch import scratch_tensors
from zerofx.runtime.offload.stream import FIELDS, ChunkStream

log = logging.getLogger(__name__)
# A whole-state pass (a checkpoint's save or load, the start) of a large state takes minutes
# at disk speed: past NOTE_S it says how far it is, then every NOTE_EVERY_S.
NOTE_S, NOTE_EVERY_S = 10.0, 30.0

# The offloaded states by id, for the step graph's ops (offload/ops.py). A table of their own,
# not graph_ops' table of training states: what reads that one (zerofx.zero, deepspeed.utils'
# helpers) expects runtimes there.
STATES = IdTable("offloaded optimizer state",
                 "the engine (its runtime) alive while its step graph runs")
lookup = STATES.lookup

_ALL, _NONE = (0, 3), (0, 0)


class OffloadedState:
    """The optimizer state of ``plan``'s shard on disk (see the module doc)."""

    def __init__(self, plan, *, kind: str, hyper, path: str, chunk: int, buffer_count: int,
                 block_size: int, threads: int):
        self.plan, self.kind, self.hyper = plan, kind, hyper
        self.root = path  # nvme_path: staged whole copies go beside the state (staged)
        self.numel = plan.shard_numel
        starts = [s.offset for s in plan.params] + [plan.padded_numel]
        self.bounds = torch.tensor(starts, dtype=torch.int64)
        cuts = _lamb_cuts(plan, starts) if kind == "lamb" else None
        self.chunks = chunk_plan(self.numel, chunk, cuts)
        self._segments = [_segments(plan, a, b) for a, b in self.chunks]
        self.file = StateFile.create(path, 3 * 4 * self.numel, rank=plan.rank,
                                     block_size=block_size)
        self.stream = ChunkStream(self.file, self.chunks, buffer_count=buffer_count,
                                  threads=threads)
        self.broken: str | None = None
        self.id = STATES.add(self)  # the step graph's ops name it by this id (lookup)
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    @property
    def num_tensors(self) -> int:
        return self.bounds.numel() - 1

    def memory_bytes(self) -> int:
        """Bytes held in memory: the chunk buffers."""
        return self.stream.buffer_bytes()

    # ---- the optimizer step (through offload/ops.py's ops) -------------------------------
    def adam(self, g, out, *, lr, step, coef, skip, beta1, in_place: bool,
             sink=None) -> None:
        """Fused Adam/AdamW over the shard, chunk by chunk; ``out`` takes the compute-dtype
        values (the flat parameters' rows when ``in_place``, else shard-shaped), or each
        chunk's go to ``sink`` (offload/params.py's StepWriter: stage 3's shard on NVMe)."""
        if float(skip):  # the kernel would change nothing: no I/O either
            return

        def visit(i, a, b, fields):
            master, m, v = fields
            dst = sink.begin(a, b) if sink is not None else out
            for lo, hi, flat in self._segments[i]:
                o = lo - a if sink is not None else flat if in_place else lo
                adam_step_(master[lo - a:hi - a], g[lo:hi], m[lo - a:hi - a], v[lo - a:hi - a],
                           lr=lr, step=step, hyper=self.hyper, grad_scale=coef, skip=skip,
                           param_out=dst[o:o + hi - lo], beta1=beta1)
            if sink is not None:
                sink.end(a, b)
        self._run(visit, read=_ALL, write=_ALL)

    def lamb_moments(self, g, *, coef, skip, beta1) -> torch.Tensor:
        """LAMB pass 1 over the shard: new moments (written back), the [2, T] partial sums."""
        if float(skip):
            return torch.zeros(2, self.num_tensors, dtype=torch.float32)
        sums = []

        def visit(i, a, b, fields):
            master, m, v = fields
            for lo, hi, flat in self._segments[i]:
                s = lamb_moments_(master[lo - a:hi - a], g[lo:hi], m[lo - a:hi - a],
                                  v[lo - a:hi - a], self.bounds, hyper=self.hyper,
                                  grad_scale=coef, skip=skip, shard_offset=flat, beta1=beta1)
                sums.append(s)
        self._run(visit, read=_ALL, write=(1, 3))
        total = torch.zeros(2, self.num_tensors, dtype=torch.float32)
        for s in sums:  # in shard order, as the in-memory step adds its ranges' sums
            total = total + s
        return total

    def lamb_apply(self, ratio, out, *, lr, step, skip, beta1, in_place: bool,
                   sink=None) -> None:
        """LAMB pass 2 over the shard: new master weights (written back) and ``out`` (or
        ``sink``, as in ``adam``)."""
        if float(skip):
            return

        def visit(i, a, b, fields):
            master, m, v = fields
            dst = sink.begin(a, b) if sink is not None else out
            for lo, hi, flat in self._segments[i]:
                o = lo - a if sink is not None else flat if in_place else lo
                lamb_apply_(master[lo - a:hi - a], m[lo - a:hi - a], v[lo - a:hi - a],
                            self.bounds, ratio, lr=lr, step=step, hyper=self.hyper, skip=skip,
                            shard_offset=flat, param_out=dst[o:o + hi - lo], beta1=beta1)
            if sink is not None:
                sink.end(a, b)
        self._run(visit, read=_ALL, write=(0, 1))

    # ---- the whole state (checkpoints, the optimizer's state_dict, initialisation) --------
    def staged(self, numels: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
        """Zero fp32 tensors of ``numels`` (default: the three fields, shard-sized) backed by
        files beside the state (offload/scratch.py): whole copies for checkpoints and
        state_dict that need not fit in memory."""
        return scratch_tensors(self.root, numels or dict.fromkeys(FIELDS, self.numel),
                               rank=self.plan.rank)

    def read_all(self, into: dict | None = None) -> dict[str, torch.Tensor]:
        """The three fields as shard-sized tensors read from the file (into ``into``'s
        tensors when given, e.g. staged ones; else new ones in memory)."""
        whole = into if into is not None else \
            {k: torch.empty(self.numel, dtype=torch.float32) for k in FIELDS}

        def visit(i, a, b, fields):
            for k, t in zip(FIELDS, fields):
                whole[k][a:b].copy_(t)
        self._run(self._noted(visit, "reading it whole (a checkpoint, state_dict)"),
                  read=_ALL, write=_NONE)
        return whole

    def write_all(self, whole: dict) -> None:
        """Replace the state by ``whole`` (field -> shard-sized tensor; a missing or None
        field is zeros). Repairs a broken state when it completes."""
        def visit(i, a, b, fields):
            for k, t in zip(FIELDS, fields):
                src = whole.get(k)
                t.copy_(src[a:b]) if src is not None else t.zero_()
        self._run(self._noted(visit, "writing it whole (a checkpoint's load)"),
                  read=_NONE, write=_ALL)
        self.broken = None

    def fill(self, fill_master) -> None:
        """Initialise the state chunk by chunk: ``fill_master(a, b, master)`` writes chunk
        [a, b)'s master weights into ``master``; the moments start at zero. The shard is
        never whole in memory (TrainState.fill_shard)."""
        def visit(i, a, b, fields):
            fill_master(a, b, fields[0])
            fields[1].zero_()
            fields[2].zero_()
        self._run(self._noted(visit, "filling it (the start)"), read=_NONE, write=_ALL)
        self.broken = None

    def close(self) -> None:
        """Free the disk space and the buffers (engine.destroy, ZeroRuntime.close, exit)."""
        self.stream.close()
        self.file.close()
        self.broken = "it was closed (engine.destroy / ZeroRuntime.close)"

    def _noted(self, visit, doing: str):
        """``visit``, saying how far the pass is once it has run NOTE_S (a large state's
        whole pass takes minutes: never silent that long)."""
        start = time.monotonic()
        due = [start + NOTE_S]

        def noted(i, a, b, fields):
            visit(i, a, b, fields)
            now = time.monotonic()
            if now >= due[0] and b < self.numel:
                due[0] = now + NOTE_EVERY_S
                done = 12 * b / 2**30
                log.warning("zerofx: offloaded optimizer state of rank %d (%s): %s, %.1f of "
                            "%.1f GiB (%d%%) after %.0f s", self.plan.rank, self.file.path,
                            doing, done, 12 * self.numel / 2**30, 100 * b // self.numel,
                            now - start)
        return noted

    def _run(self, visit, *, read, write) -> None:
        if read != _NONE and self.broken is not None:
            raise OffloadError(
                f"the offloaded optimizer state in {self.file.path} is not usable: {self.broken}."
                f" Nothing of it is read again; load the last checkpoint (it rewrites the state) "
                f"or restart")
        try:
            self.stream.run(visit, read=read, write=write)
        except BaseException as e:
            if write != _NONE:  # some chunks may be written and others not
                self.broken = f"a write failed part way ({type(e).__name__}: {e})"
            raise


def chunk_plan(numel: int, chunk: int, cuts=None) -> list[tuple[int, int]]:
    """[a, b) chunks covering [0, numel), at most ``chunk`` long, cut only at ``cuts``
    (None: anywhere); a stretch between two neighbouring cuts longer than ``chunk`` is one
    chunk."""
    if cuts is None:
        return [(a, min(a + chunk, numel)) for a in range(0, numel, chunk)]
    points = sorted({c for c in cuts if 0 < c < numel} | {numel}) if numel else []
    out, a = [], 0
    while a < numel:
        j = bisect.bisect_right(points, a + chunk) - 1
        b = points[j] if j >= 0 and points[j] > a else points[bisect.bisect_right(points, a)]
        out.append((a, b))
        a = b
    return out


def _lamb_cuts(plan, starts: list[int]) -> list[int]:
    """Shard offsets where a LAMB chunk may end: owned range ends and tensor starts."""
    cuts = []
    for r in plan.owned():
        cuts.append(r.at + r.numel)
        lo = bisect.bisect_right(starts, r.start)
        hi = bisect.bisect_left(starts, r.start + r.numel)
        cuts += [r.at + f - r.start for f in starts[lo:hi]]
    return cuts


def _segments(plan, a: int, b: int) -> list[tuple[int, int, int]]:
    """The owned ranges' parts inside chunk [a, b): (shard lo, shard hi, flat offset of
    lo). One kernel call each, as the in-memory step calls it once per owned range."""
    out = []
    for r in plan.owned():
        lo, hi = max(a, r.at), min(b, r.at + r.numel)
        if lo < hi:
            out.append((lo, hi, r.start + lo - r.at))
    return out


def check_offloadable(device: torch.device, kind: str) -> None:
    """What NVMe offload needs of the run: a CPU run and zerofx's fused optimizer."""
    if device.type != "cpu":
        raise OffloadError(
            f"offload_optimizer device 'nvme' with parameters on {device}: zerofx streams the "
            f"offloaded state on CPU-only runs; with a GPU use device 'cpu' (the state in "
            f"host memory, ZeRO-Offload) or train on the CPU")
    if kind == "torch":
        raise OffloadError(
            "offload_optimizer device 'nvme' runs zerofx's fused Adam, AdamW or Lamb on each "
            "chunk; a torch optimizer object cannot be streamed: configure the optimizer in "
            "the config's \"optimizer\" block instead of passing one")
