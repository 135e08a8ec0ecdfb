"""ParamGather: ZeRO stage 3's parameter side, whole parameters gathered from shards on demand.

At stage 3 a parameter lives between uses only as this rank's 1/N of its bucket (the
compute-dtype shard the optimizer writes, ``rt.state.shard_lowp``, or with offload_param
nvme a file read bucket by bucket, offload/params.py). The graphs gather a bucket
right before its parameters are first read (``zerofx.gather_bucket``, inserted by the zero3
pass) and drop it after their last read; backward gathers again. A bucket is the unit one
all-gather moves: its rank slices are contiguous in the shard, and the all-gather's output
is the bucket itself, so the common case copies nothing.

Which collectives run is decided by the graphs alone (which node runs, with which
parameters), never by what happens to be alive: every rank issues the same all-gathers in
the same order on a process group of their own, so they cannot pair with the gradient
buckets' collectives that backward has in flight on the data-parallel group.
"""
from __future__ import annotations

import weakref
import zlib

import torch

from zerofx.runtime.comm.forms import start_gather
from zerofx.runtime.comm.pending import Pending
from zerofx.runtime.comm.dist import same_on_every_rank


_DIVERGED = (
    "ZeRO stage 3: the ranks are about to gather different parameters (their batches took "
    "different branches, or they run different graphs); all-gathers pair by order, so the "
    "weights would be pieces of other weights. Refused, parameters unchanged: stage 3 needs "
    "every rank to read the same parameters in the same order (as DeepSpeed's does). Make "
    "the branch independent of the data, or use stage 2")


class RanksDivergedError(RuntimeError):
    """The data-parallel ranks gathered different buckets in one step."""


class ParamGather:
    """Bucket all-gathers of one ZeroRuntime, prefetches in flight and live-memory counts."""

    def __init__(self, plan, state, comm):
        """``state``: the runtime's TrainState (stage 3's shard, the persistent buckets);
        ``comm``: its CommContext, whose ``param_group`` the gathers run on."""
        self.plan, self.state, self.comm = plan, state, comm
        self.group = comm.param_group
        self.device = state.flat_params.device
        self._inflight: dict[int, tuple[torch.Tensor, Pending]] = {}  # bucket -> (out, work)
        self._buffers: dict[int, int] = {}  # offload_param: bucket -> its source's buffer
        self.gathers = 0  # all-gathers issued (tests and the dump count them)
        self._signature = 0  # a running hash of the buckets gathered, in order
        self.live = 0  # elements of gathered buckets some graph still holds
        self.peak = 0  # the most ``live`` has been since reset_peak()

    # ---- what the graphs call -------------------------------------------------------------
    @torch.no_grad()
    def bucket(self, slots: list[int], ks: list[int], offsets: list[int], length: int,
               ahead: list[int]) -> torch.Tensor:
        """The parameters ``slots[k]`` (k in ``ks``) whole, laid out as the graph was traced:
        parameter ``ks[j]`` at ``offsets[j]`` of a ``length``-element tensor. ``ahead``: the
        positions of parameters the graph reads next, whose buckets start gathering now."""
        params = self.plan.params
        wanted = [params[slots[k]] for k in ks]
        buckets = sorted({s.bucket for s in wanted})
        self.prefetch([params[slots[k]].bucket for k in ahead if slots[k] >= 0])
        if len(buckets) == 1:
            b = self.plan.buckets[buckets[0]]
            whole = self._whole(b.index)
            if whole.numel() == length and all(s.offset - b.offset == o
                                               for s, o in zip(wanted, offsets)):
                return whole  # laid out as traced: the gathered bucket itself
        # Another call of a reused graph (other parameters, other buckets): copy each one to
        # where the graph reads it.
        out = torch.zeros(length, dtype=self.plan.compute_dtype, device=self.device)
        wholes = {i: self._whole(i) for i in buckets}
        for s, o in zip(wanted, offsets):
            b = self.plan.buckets[s.bucket]
            out[o:o + s.numel].copy_(wholes[s.bucket][s.offset - b.offset:s.end - b.offset])
        return out

    def check_same_graph(self, check: int, slots: list[int]) -> None:
        """Before a graph's first gather: every rank must be about to gather the same
        buckets. All-gathers pair by order, so a rank whose batch took another branch would
        be sent pieces of another weight (or abort inside gloo on a size mismatch); one
        2-element all-reduce per graph call refuses that first, on every rank."""
        mine = zlib.crc32(repr((check, slots)).encode())
        if not same_on_every_rank(mine, self.group, self.device):
            raise RanksDivergedError(_DIVERGED)

    def prefetch(self, buckets) -> None:
        """Start the all-gathers of ``buckets`` not gathered or in flight yet."""
        for i in buckets:
            b = self.plan.buckets[i]
            if i in self._inflight or self._persistent(b):
                continue
            src = self._source(i)
            out = torch.empty(b.padded, dtype=self.plan.compute_dtype, device=self.device)
            form = self.comm.forms["param_gather"].form
            work = start_gather(form, src, out, self.group, mirror=self.comm.shm.get(
                "param_gather"), key=i, base=b.offset).logged(
                    self.comm.log, "stage3 gather", i, form, b.padded, out.dtype)
            # The graphs get (and the count follows) an alias of the buffer, not the tensor
            # gloo's work holds: gloo's worker drops its reference some time after wait()
            # returns, which would make the count depend on thread timing (a CI run saw a
            # peak of 2.5 buckets where the graph held 2).
            alias = out.detach()
            self._inflight[i] = (alias, work)
            self._track(alias)  # memory from now on, in flight or not
            self.gathers += 1
            self._signature = (self._signature * 1_000_003 + i + 1) % (1 << 61)

    # ---- inside -------------------------------------------------------------------------
    def _source(self, i: int) -> torch.Tensor:
        """This rank's slice of bucket ``i``: a view of the shard, or (offload_param nvme)
        a buffer read from its file, held until the gather is waited for."""
        store = self.state.params
        if store is None:
            mine = self.plan.owned()[i]
            return self.state.shard_lowp[mine.at:mine.at + mine.numel]
        src, slot = store.take(i, self._make_room)
        self._buffers[i] = slot
        return src

    def _finished(self, i: int) -> None:
        """Bucket ``i``'s gather was waited for: its source buffer is free again."""
        slot = self._buffers.pop(i, None)
        if slot is not None:
            self.state.params.release(slot)

    def _make_room(self) -> None:
        """Every read buffer is a gather's source: wait for the oldest such gather."""
        i = next(iter(self._buffers))
        out, work = self._inflight[i]
        work.wait()
        self._inflight[i] = (out, Pending([]))  # done: its later wait is free
        self._finished(i)

    def _persistent(self, b) -> bool:
        return b.offset >= self.plan.persist_offset

    def _whole(self, i: int) -> torch.Tensor:
        b = self.plan.buckets[i]
        if self._persistent(b):  # kept whole after every step
            return self.state.bucket_view(self.plan, i)
        self.prefetch([i])
        out, work = self._inflight.pop(i)
        work.wait()
        self._finished(i)
        return out

    def _track(self, out: torch.Tensor) -> None:
        """Count ``out`` as live until the last view of it is gone."""
        self.live += out.numel()
        self.peak = max(self.peak, self.live)
        weakref.finalize(out, self._freed, out.numel())

    def _freed(self, numel: int) -> None:
        self.live -= numel

    def drain(self) -> None:
        """Before the shard changes (the optimizer step): finish prefetches nobody took, and
        check that every rank gathered the same buckets in the same order since the last
        step. All-gathers pair by order: a rank whose batch took another branch would have
        been sent pieces of another bucket of the same size, silently; this refuses the
        step (parameters untouched) instead. One 2-element all-reduce per step."""
        for i, (_, work) in list(self._inflight.items()):
            work.wait()
            self._finished(i)
        self._inflight.clear()
        if self.state.params is not None:
            self.state.params.end_step()  # reads started ahead would be old values
        agreed = same_on_every_rank(self._signature, self.group, self.device)
        self._signature = 0
        if not agreed:
            raise RanksDivergedError(_DIVERGED)

    def reset_peak(self) -> None:
        self.peak = self.live

    # ---- eager use ----------------------------------------------------------------------
    @torch.no_grad()
    def whole_params(self, names) -> dict[str, torch.Tensor]:
        """{name: whole value} of plan parameters ``names`` (a collective: every rank of the
        data-parallel group calls it with the same names). Fresh tensors, not views."""
        plan = self.plan
        slots = [plan.slot(n) for n in names]
        buckets = sorted({s.bucket for s in slots})
        self.prefetch(buckets)
        wholes = {i: self._whole(i) for i in buckets}
        out = {}
        for s in slots:
            b = plan.buckets[s.bucket]
            out[s.name] = wholes[s.bucket][s.offset - b.offset:s.end - b.offset].view(
                s.shape).clone()
        return out
