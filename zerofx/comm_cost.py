"""Predicted time of one collective: a fixed cost per call plus its bytes over a rate (the
alpha-beta model), for the dump's table of the collectives in each graph.

The rates come from the forms the runtime timed on its data-parallel group at startup
(runtime/comm/forms.py); a kind it did not time, or a run without a runtime, falls back to
DEFAULT, measured by benchmarks/bench_collectives.py (2 ranks, gloo on loopback, 16M bf16
elements, an AVX2-only AMD EPYC, 2026-12-02). A prediction for another group (the
tensor-parallel one) uses the same rates: same machine, same transport.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = float(1 << 20)
# Each gloo call costs about this however small (loopback; docs/design.md).
LATENCY_MS = 0.3


@dataclass(frozen=True)
class CommCost:
    """ms per MiB moved, by kind, and where the numbers come from."""

    ms_per_mib: tuple[tuple[str, float], ...]
    source: str
    latency_ms: float = LATENCY_MS

    def predict_ms(self, kind: str, nbytes: int) -> float:
        """``nbytes``: the whole buffer the collective reduces or gathers."""
        rate = dict(self.ms_per_mib).get(kind)
        if rate is None:
            rate = dict(DEFAULT.ms_per_mib)[kind]
        return self.latency_ms + rate * nbytes / MIB


DEFAULT = CommCost(
    ms_per_mib=(("all_reduce", 1.53), ("reduce_scatter", 1.85), ("all_gather", 1.02),
                ("p2p_reduce", 0.87), ("p2p_gather", 0.53), ("shm_reduce", 0.36),
                ("shm_gather", 0.34)),
    source="benchmarks/bench_collectives.py: 2 ranks, gloo, 16M bf16, AVX2 EPYC")


def fitted(timed: list[tuple[str, int, float]]) -> CommCost:
    """A CommCost from (kind, bytes, ms) timings (a form's kind: runtime/comm/forms.Form);
    DEFAULT when there are none."""
    # Below about a MiB the fixed cost dominates and the rate cannot be read from one
    # timing: those kinds keep DEFAULT's rate.
    rates = {kind: max(0.0, ms - LATENCY_MS) / (nbytes / MIB)
             for kind, nbytes, ms in timed if nbytes >= MIB}
    if not rates:
        return DEFAULT
    return CommCost(tuple(sorted(rates.items())),
                    source="timed on this run's data-parallel group at startup "
                           "(other kinds: " + DEFAULT.source + ")")
