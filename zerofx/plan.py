"""The layout plan: one source of truth for where every parameter lives.

Computed once per model (or compiled graph) and config, before any pass runs:

    parameters ─▶ one flat buffer, cut into constant-size buckets (reduce_bucket_size
                  elements), each padded to divide by the data-parallel size
               ─▶ per-rank shards: under ZeRO 1/2 rank r owns the r-th 1/N of every bucket

Sharding bucket by bucket (not the flat buffer as a whole) makes every bucket's
reduce-scatter and all-gather an equal split with no re-layout; a rank's shard is the
concatenation of its slices, in bucket order, so the fused optimizer still runs over one
contiguous flat tensor.
    ranks      ─▶ a tensor-parallel × data-parallel grid of process groups

Passes read the plan; the runtime allocates from it; the dump prints it. It holds plain data
only (no tensors, no process-group handles) so it can be built, printed and tested anywhere.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from tabulate import tabulate

from zerofx.config import Config, ConfigError
from zerofx.tp.layout import TPLayout, TPShard


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in the flat buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # first element in the flat buffer
    numel: int
    bucket: int  # index into Plan.buckets
    tp: TPShard | None = None  # split by zerofx over the TP group (shape is the local one)
    tp_split: bool = False  # differs across TP ranks (else replicated: counted once in norms)
    persistent: bool = False  # stage 3: kept whole on every rank (below the threshold)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Bucket:
    """A constant-size run of the flat gradient buffer, communicated as one collective."""

    index: int
    offset: int
    numel: int  # elements of parameters in it
    padded: int  # numel rounded up to a multiple of the DP size
    params: tuple[str, ...]  # in the order their gradients fill the bucket


@dataclass(frozen=True)
class OwnedRange:
    """The part of one bucket a rank updates: flat[start:start+numel] = shard[at:at+numel]."""

    bucket: int
    start: int
    numel: int
    at: int


@dataclass(frozen=True)
class OwnedPiece:
    """The part of one parameter a rank updates: shard[at:at+numel] holds the parameter's
    flattened elements [start, start+numel)."""

    slot: ParamSlot
    start: int
    numel: int
    at: int


@dataclass(frozen=True)
class ProcessGrid:
    """Ranks as a tensor-parallel × data-parallel grid; TP neighbours are adjacent ranks.

    Adjacent TP ranks follow Megatron: TP traffic is heaviest, so it stays within a node.
    """

    world_size: int
    tp_size: int

    def __post_init__(self):
        if self.tp_size < 1 or self.world_size % self.tp_size:
            divisors = [d for d in range(1, self.world_size + 1) if self.world_size % d == 0]
            raise ConfigError(
                f"tensor_parallel.size={self.tp_size} must divide the world size "
                f"{self.world_size} (the number of processes); pick one of {divisors}, or "
                f"launch a multiple of {self.tp_size} processes"
            )

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp_size

    def tp_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.tp_size)) for s in range(0, self.world_size, self.tp_size)]

    def dp_groups(self) -> list[list[int]]:
        return [list(range(t, self.world_size, self.tp_size)) for t in range(self.tp_size)]


@dataclass(frozen=True)
class Plan:
    """Layout of parameters, buckets, shards and process groups for one rank."""

    rank: int
    grid: ProcessGrid
    zero_stage: int
    compute_dtype: torch.dtype
    params: tuple[ParamSlot, ...]
    buckets: tuple[Bucket, ...]
    padded_numel: int  # flat buffer length: the sum of the padded buckets
    reduce_scatter: bool = True  # stage 2 reduce-scatters buckets (else all-reduce + slice)
    tp_choices: tuple = ()  # TPChoice per split Linear: what the layout chose and why
    # what gradients accumulate and are reduced in (Config.grad_dtype; None, in plans built
    # by hand: the compute dtype)
    grad_accum_dtype: torch.dtype | None = None
    tp_left_whole: tuple = ()  # (projection weight, why) the layout could not split

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def sharded(self) -> bool:
        """ZeRO 1-3: master weights and optimizer state are split across the DP group."""
        return self.zero_stage >= 1 and self.grid.dp_size > 1

    @property
    def partitioned(self) -> bool:
        """ZeRO 3: the parameters themselves live as shards, gathered for each use."""
        return self.zero_stage == 3 and self.grid.dp_size > 1

    @functools.cached_property
    def persist_offset(self) -> int:
        """Where the buckets of parameters kept whole begin (all of them below stage 3): the
        model-side parameter buffer holds only ``[persist_offset, padded_numel)``."""
        if not self.partitioned:
            return 0
        return next((self.buckets[p.bucket].offset for p in self.params if p.persistent),
                    self.padded_numel)

    def owned(self, dp_rank: int | None = None) -> tuple[OwnedRange, ...]:
        """What ``dp_rank`` (default: this rank) updates, bucket by bucket."""
        dp_rank = self.grid.dp_rank(self.rank) if dp_rank is None else dp_rank
        ranges, at = [], 0
        for b in self.buckets:
            per = b.padded // self.grid.dp_size if self.sharded else b.padded
            start = b.offset + (dp_rank * per if self.sharded else 0)
            ranges.append(OwnedRange(b.index, start, per, at))
            at += per
        return tuple(ranges)

    def owned_pieces(self, dp_rank: int | None = None) -> tuple[OwnedPiece, ...]:
        """Every parameter's part of what ``dp_rank`` (default: this rank) updates, in shard
        order: the one place that maps parameters onto shard offsets."""
        pieces = []
        for r in self.owned(dp_rank):
            for name in self.buckets[r.bucket].params:
                s = self.slot(name)
                lo, hi = max(s.offset, r.start), min(s.end, r.start + r.numel)
                if lo < hi:
                    pieces.append(OwnedPiece(s, lo - s.offset, hi - lo, r.at + lo - r.start))
        return tuple(pieces)

    @functools.cached_property
    def _pieces_by_name(self) -> dict[str, tuple[OwnedPiece, ...]]:
        by_name: dict[str, list] = {}
        for piece in self.owned_pieces():
            by_name.setdefault(piece.slot.name, []).append(piece)
        return {n: tuple(v) for n, v in by_name.items()}

    def owned_pieces_of(self, name: str) -> tuple[OwnedPiece, ...]:
        """This rank's pieces of parameter ``name`` (none when it owns nothing of it)."""
        return self._pieces_by_name.get(name, ())

    @property
    def reduces_into_shard(self) -> bool:
        """Stage 2: each bucket is reduce-scattered straight into this rank's shard."""
        return self.sharded and self.bucket_collective == "reduce_scatter"

    @property
    def bucket_collective(self) -> str:
        """The collective each bucket's gradients go through at an accumulation boundary."""
        if self.grid.dp_size == 1:
            return "none (one rank)"
        return "reduce_scatter" if self.zero_stage >= 2 and self.reduce_scatter \
            else "all_reduce"

    @property
    def shard_numel(self) -> int:
        return sum(r.numel for r in self.owned())

    @functools.cached_property
    def _slot_index(self) -> dict[str, ParamSlot]:
        return {p.name: p for p in self.params}

    def slot(self, name: str) -> ParamSlot:
        try:  # called per gradient per step by the runtime: a dict, not a scan
            return self._slot_index[name]
        except KeyError:
            raise KeyError(f"parameter {name!r} is not in the plan") from None

    @property
    def grad_dtype(self) -> torch.dtype:
        """The dtype of the gradient buffers and their reductions."""
        return self.grad_accum_dtype or self.compute_dtype

    def predicted_bytes(self) -> dict[str, int]:
        """Bytes per rank of the training state this plan implies (what the dump reports)."""
        total, mine = self.padded_numel, self.shard_numel
        state = mine
        if self.partitioned:  # a shard of each parameter, plus the persistent ones whole
            total = mine + self.padded_numel - self.persist_offset
        grads = mine if self.zero_stage >= 2 else total
        lowp = self.compute_dtype.itemsize
        return {
            "master_fp32": 4 * state,
            "optimizer_state": 8 * state,  # Adam: two fp32 moments
            "gradients": self.grad_dtype.itemsize * grads,
            "compute_params": lowp * total if self.compute_dtype != torch.float32 else 0,
        }

    def describe(self, reduce_form: str | None = None) -> str:
        """A readable table of the layout, for dumps and logs (``reduce_form``: the form the
        runtime timed fastest for the buckets' reduction, shown as their collective)."""
        rows = [(p.name, "x".join(map(str, p.shape)) or "scalar", p.offset, p.numel, p.bucket,
                 _tp_text(p.tp)) for p in self.params]
        head = (f"plan: rank {self.rank}, world {self.grid.world_size} "
                f"(tp {self.grid.tp_size} x dp {self.grid.dp_size}), zero stage "
                f"{self.zero_stage}, compute {str(self.compute_dtype).removeprefix('torch.')}, "
                f"{self.numel} elements ({self.padded_numel} padded), "
                f"{len(self.buckets)} bucket(s)")
        mem = tabulate(sorted(self.predicted_bytes().items()), headers=["state", "bytes/rank"])
        table = tabulate(rows, headers=["param", "local shape", "offset", "numel", "bucket",
                                        "tensor parallel"])
        collective = self.bucket_collective if reduce_form is None else \
            f"{self.bucket_collective} as {reduce_form}"
        buckets = tabulate([(b.index, b.numel, b.padded, len(b.params), collective)
                            for b in self.buckets],
                           headers=["bucket", "numel", "padded", "params", "collective"])
        text = f"{head}\n{table}\n\n{buckets}\n\n{mem}"
        if self.partitioned:
            whole = [p.name for p in self.params if p.persistent]
            text += (f"\n\nstage 3: parameters live as 1/{self.grid.dp_size} shards, gathered "
                     f"bucket by bucket before use; {len(whole)} kept whole (persistence "
                     f"threshold): {', '.join(whole) or 'none'}")
        if self.tp_choices:
            text += "\n\ntensor-parallel layout:\n" + tabulate(
                [(c.module, c.style, c.parts, c.reason) for c in self.tp_choices],
                headers=["module", "style", "parts", "chosen because"])
        if self.tp_left_whole:
            text += "\n\nleft whole (replicated on every tensor-parallel rank):\n" + tabulate(
                self.tp_left_whole, headers=["weight", "why"])
        return text


def _tp_text(shard: TPShard | None) -> str:
    if shard is None:
        return ""
    full = "x".join(map(str, shard.full_shape))
    parts = f", {shard.parts} parts" if shard.parts > 1 else ""
    return f"split dim {shard.dim} of {full}{parts}"


def make_plan(
    named_params: list[tuple[str, torch.Tensor]],
    config: Config,
    *,
    rank: int = 0,
    world_size: int = 1,
    tp_layout: TPLayout | None = None,
    mp_params: frozenset = frozenset(),
    keep_whole: frozenset = frozenset(),
) -> Plan:
    """Lay out ``named_params`` (in registration order) for ``config`` on this rank.

    With a ``tp_layout``, split parameters take their local (1/tp) shape. ``mp_params`` names
    parameters a user's own model parallelism (an mpu) has already split. ``keep_whole``
    names parameters stage 3 keeps whole whatever their size (those of modules Dynamo always
    runs eagerly: only compiled graphs gather partitioned weights).

    Buckets fill in *reverse* registration order: backward produces gradients roughly last
    layer first, so a bucket completes (and its collective can start) as early as possible.
    """
    grid = ProcessGrid(world_size, tp_layout.size if tp_layout is not None
                       else config.tensor_parallel.size)
    zero = config.zero_optimization
    shards = tp_layout.shards if tp_layout is not None else {}
    shapes = {n: shards[n].local_shape(grid.tp_size) if n in shards else tuple(p.shape)
              for n, p in named_params}
    sizes = {n: math.prod(shapes[n]) for n in shapes}
    persist = _persistent(named_params, sizes, zero) | keep_whole \
        if zero.stage == 3 and grid.dp_size > 1 else frozenset()
    cap = max(1, zero.reduce_bucket_size)
    if zero.stage == 3 and grid.dp_size > 1:
        cap = min(cap, zero.stage3_prefetch_bucket_size)  # a bucket is one gather
    # Persistent parameters get buckets of their own, last: those are all-gathered after
    # every step into a whole copy; the others are gathered by the graphs on demand.
    order = [(n, sizes[n]) for n, _ in reversed(named_params) if n not in persist]
    groups = group_into_buckets(order, cap) + group_into_buckets(
        [(n, sizes[n]) for n, _ in reversed(named_params) if n in persist], cap)
    dtypes = dict((n, p.dtype) for n, p in named_params)
    slots, buckets, offset = [], [], 0
    for index, group in enumerate(groups):
        start = offset
        for name, numel in group:
            slots.append(ParamSlot(name, shapes[name], dtypes[name], offset, numel, index,
                                   shards.get(name), name in shards or name in mp_params,
                                   name in persist))
            offset += numel
        numel = offset - start
        padded = math.ceil(max(numel, 1) / grid.dp_size) * grid.dp_size
        buckets.append(Bucket(index, start, numel, padded, tuple(n for n, _ in group)))
        offset = start + padded
    return Plan(rank=rank, grid=grid, zero_stage=config.zero_optimization.stage,
                compute_dtype=config.compute_dtype, params=tuple(slots),
                buckets=tuple(buckets), padded_numel=offset,
                reduce_scatter=config.zero_optimization.reduce_scatter,
                grad_accum_dtype=config.grad_dtype,
                tp_choices=tp_layout.choices if tp_layout is not None else (),
                tp_left_whole=tp_layout.left_whole if tp_layout is not None else ())


def _persistent(named_params, sizes: dict, zero) -> frozenset:
    """Stage 3's parameters kept whole, by DeepSpeed's rule (mark_persistent_parameters): in
    registration order, one of at most ``param_persistence_threshold`` elements persists
    while the persisted total stays within ``model_persistence_threshold``."""
    kept, total = set(), 0
    for name, _ in named_params:
        if sizes[name] + total > zero.stage3_model_persistence_threshold:
            continue
        if sizes[name] <= zero.stage3_param_persistence_threshold:
            kept.add(name)
            total += sizes[name]
    return frozenset(kept)


def group_into_buckets(order, cap: int) -> list[list]:
    """Consecutive (item, numel) pairs grouped greedily: a group closes once it holds ``cap``
    elements (a big item gets its own). The one grouping rule of the plan's buckets, the
    step's all-gather chunks and plain compile's gradient buckets."""
    groups: list[list] = []
    filled = cap
    for name, numel in order:
        if filled + numel > cap and (not groups or groups[-1]):
            groups.append([])
            filled = 0
        groups[-1].append((name, numel))
        filled += numel
    return groups


# All-gathers kept in flight at once: on gloo, 4-8 concurrent all-gathers of one 17M-element
# bf16 buffer take 16-18 ms against 30 ms for one (2 ranks, loopback; a probe run this
# session), since each chunk's transfer overlaps the others' copies.
GATHERS_IN_FLIGHT = 4


def gather_chunks(plan, config) -> list[list[tuple]]:
    """The step's all-gathers: each a list of (owned range, bucket), contiguous in the shard."""
    return allgather_chunks(plan, gather_limit(plan, config))


def gather_limit(plan, config) -> int:
    """Elements per all-gather: at most allgather_bucket_size (DeepSpeed's cap), and small
    enough that GATHERS_IN_FLIGHT of them cover the buffer."""
    return max(1, min(config.zero_optimization.allgather_bucket_size,
                      -(-plan.padded_numel // GATHERS_IN_FLIGHT)))


def allgather_chunks(plan, limit: int) -> list[list[tuple]]:
    """Consecutive buckets grouped so each all-gather moves about ``limit`` elements: fewer,
    larger collectives (each gloo call costs ~0.3 ms however small). At stage 3 only the
    persistent buckets: the graphs gather the others when they read them."""
    order = [((r, b), b.padded) for r, b in zip(plan.owned(), plan.buckets)
             if b.offset >= plan.persist_offset]
    return [[rb for rb, _ in chunk] for chunk in group_into_buckets(order, limit)]
