"""Where a load reads the saved fp32 state from, by parameter name and element range.

    src = saved_state(tag_dir, meta, alloc)       # RangeSource or WholeSource
    src.read("master", name, start, numel, out)    # elements [start, start+numel) of the
                                                   # flattened parameter, into ``out``
    src.whole("exp_avg", name)                     # the whole parameter, its saved shape
    src.files                                      # {(TP rank, DP rank): rank file} read

A load needs of each state kind only what this rank owns (its shard's pieces) and its whole
persistent parameters. Assembling the whole model's state first, as consolidation does,
costs every rank 12 bytes per parameter of the *model*, in memory or, offloaded, on disk;
reading by range costs what the rank keeps:

- RangeSource: a checkpoint saved without tensor parallelism. Its rank files are mapped
  (files.read_rank), and each range is copied from the saved shards that cover it: nothing
  is assembled.
- WholeSource: a checkpoint saved with tensor parallelism: its pieces are joined into whole
  parameters first (files.full_states, in tensors of ``alloc``, file-backed for an
  NVMe-offloaded run), as the join needs every TP rank's piece.
"""
from __future__ import annotations

import bisect

import torch

from zerofx.checkpoint.files import STATE_KEYS, full_states, needed_ranks, read_shards


class RangeSource:
    """The saved state of a checkpoint without tensor parallelism, read by range."""

    def __init__(self, meta: dict, shards: list[dict], files: dict | None = None):
        self.params = {p["name"]: (p["offset"], p["numel"], tuple(p["shape"]))
                       for p in meta["params"]}
        # (flat start, numel, shard offset, shard index), by flat start: the ranges tile the
        # flat buffer (files.read_shards checked it)
        spans = sorted((start, numel, at, i) for i, s in enumerate(shards)
                       for start, numel, at in s["ranges"])
        self.spans, self.starts, self.shards = spans, [s[0] for s in spans], shards
        # {(TP rank, DP rank): rank file} already read, so what else a load takes from one
        # (checkpoint/buffers.py) is not read twice
        self.files = files or {}

    def read(self, key: str, name: str, start: int, numel: int, out: torch.Tensor) -> None:
        offset = self.params[name][0]
        a, b = offset + start, offset + start + numel
        j = max(bisect.bisect_right(self.starts, a) - 1, 0)
        while a < b:
            s0, n, at, i = self.spans[j]
            lo, hi = max(a, s0), min(b, s0 + n)
            if lo < hi:
                out[lo - offset - start:hi - offset - start].copy_(
                    self.shards[i][key][at + lo - s0:at + hi - s0])
                a = hi
            j += 1

    def whole(self, key: str, name: str) -> torch.Tensor:
        _, numel, shape = self.params[name]
        out = torch.empty(numel, dtype=torch.float32)
        self.read(key, name, 0, numel, out)
        return out.view(shape)


class WholeSource:
    """Whole tensors by name ({key: {name: tensor}}), read by range."""

    def __init__(self, states: dict, files: dict | None = None):
        self.states = states
        self.files = files or {}  # {(TP rank, DP rank): rank file} already read

    def read(self, key: str, name: str, start: int, numel: int, out: torch.Tensor) -> None:
        out.copy_(self.states[key][name].reshape(-1)[start:start + numel])

    def whole(self, key: str, name: str) -> torch.Tensor:
        return self.states[key][name]


def saved_state(tag_dir, meta: dict, alloc=None):
    """(the source of ``tag_dir``'s saved state, a rank file for the step counters).
    ``alloc``: where a tensor-parallel save's joined tensors go (files.full_states)."""
    if meta.get("tp_size", 1) == 1:
        shards = read_shards(tag_dir, meta)
        files = {(0, r): s for r, s in zip(needed_ranks(meta), shards)}
        return RangeSource(meta, shards, files), shards[0]
    states, counters = full_states(tag_dir, STATE_KEYS, alloc=alloc)
    return WholeSource(states, {(0, 0): counters}), counters

