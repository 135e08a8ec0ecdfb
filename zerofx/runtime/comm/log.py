"""Collective times measured while training, next to the dump's predictions.

With a dump on (ZEROFX_DUMP or zerofx.dump_dir) the runtime logs every collective it
starts on the data-parallel group: each bucket's gradient reduction, each chunk of the
step's all-gather, each stage-3 bucket gather. Per collective it keeps, over the steps
seen so far (the last SAMPLES), two medians:

    in flight ms   from the call that started it to the return of the wait for it (an
                   upper bound of its duration: completion is seen at the wait)
    blocked ms     how long the rank waited for it: the part compute did not hide

and writes them after each optimizer step (the first WRITE_FIRST, then every WRITE_EVERY)
to ``<root>/rank<r>/comm_measured.txt``, with the form the runtime chose and the time the
cost model predicts (zerofx/comm_cost.py: collectives.txt's numbers). The functional
collectives inside the graphs (tensor parallelism, the norm all-reduce) are not logged.
Without a dump nothing is recorded.
"""
from __future__ import annotations

import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate

from zerofx.comm_cost import MIB, CommCost
from zerofx.runtime.comm.forms import kind_of

SAMPLES = 64
WRITE_FIRST, WRITE_EVERY = 20, 50


@dataclass
class _Row:
    role: str  # "reduce", "gather" (the step's chunks), "stage3 gather"
    key: int  # bucket or chunk index
    kind: str  # comm_cost's name for what moves
    numel: int
    nbytes: int
    flight: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))
    blocked: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))


class CommLog:
    """Start and wait times of the runtime's collectives; see the module docstring."""

    def __init__(self, path: Path, cost: CommCost):
        self.path, self.cost = path, cost
        self.rows: dict[tuple[str, int], _Row] = {}
        self.steps = 0

    @classmethod
    def under(cls, dump_root: str, rank: int, cost: CommCost) -> "CommLog":
        return cls(Path(dump_root) / f"rank{rank}" / "comm_measured.txt", cost)

    def started(self, role: str, key: int, form: str, numel: int,
                dtype: torch.dtype) -> tuple:
        """A token for ``finished``: the collective (role, key) was just started."""
        k = (role, key)
        if k not in self.rows:
            kind = kind_of(role, form)
            self.rows[k] = _Row(role, key, kind, numel, numel * dtype.itemsize)
        return k, time.perf_counter()

    def finished(self, token: tuple, wait_began: float) -> None:
        (k, t0), now = token, time.perf_counter()
        row = self.rows[k]
        row.flight.append(now - t0)
        row.blocked.append(now - wait_began)

    def step_done(self) -> None:
        """After an optimizer step: write the table now and then."""
        self.steps += 1
        if self.steps <= WRITE_FIRST or self.steps % WRITE_EVERY == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(self.render())
            os.replace(tmp, self.path)  # a reader never sees half a table

    def render(self) -> str:
        table = []
        for r in sorted(self.rows.values(), key=lambda r: (r.role, r.key)):
            table.append([r.role, r.key, r.kind, r.numel, round(r.nbytes / MIB, 3),
                          round(self.cost.predict_ms(r.kind, r.nbytes), 2),
                          _median_ms(r.flight), _median_ms(r.blocked), len(r.flight)])
        head = ["collective", "bucket/chunk", "form", "elements", "MiB", "pred ms",
                "in flight ms", "blocked ms", "samples"]
        blocked = sum(statistics.median(r.blocked) for r in self.rows.values() if r.blocked)
        return (f"collectives measured over {self.steps} optimizer steps (medians; "
                f"'in flight' ends when the wait returns)\n\n"
                + tabulate(table, headers=head) +
                f"\n\nblocked per step (sum of medians): {blocked * 1e3:.2f} ms\n"
                f"predictions: {self.cost.source}\n")


def _median_ms(xs) -> float:
    return round(statistics.median(xs) * 1e3, 2) if xs else float("nan")
