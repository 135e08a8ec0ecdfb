"""When glibc's malloc gives a freed tensor's pages back to the system (host memory).

On a CPU job the training state, the activations and every temporary are glibc malloc
blocks (torch's CPU allocator does not cache). glibc serves a block at or above its mmap
threshold from a mapping of its own, unmapped when freed; below it, from an arena that keeps
freed pages for reuse. The threshold starts at 128 KiB but is *dynamic*: each freed mapped
block raises it to that block's size (up to 32 MiB), so after the first step the 1-32 MiB
activations of a step come from arenas, and what a step frees stays resident as holes that
other sizes cannot always reuse. Measured on bench_largest's GPT at size 12 (2 ranks, stage
3): the resident set stood 600 MiB per rank above the live tensors and crept up a step at a
time; with the threshold fixed it follows the live tensors (benchmarks/RESULTS.md, "glibc's
mmap threshold"). A fixed threshold is what makes a rank's memory what zerofx-plan counts;
it costs a step about a fifth more there (every block above it is faulted in anew), so it is
the user's choice (``zerofx.host_mmap_threshold``), off by default.

``release_freed(threshold)`` fixes it (mallopt(M_MMAP_THRESHOLD), which also turns the dynamic
raise off) unless the user set glibc's own knob (MALLOC_MMAP_THRESHOLD_ or the
glibc.malloc.mmap_threshold tunable): theirs wins. Not glibc (musl, macOS): nothing to do.
The cost: a mapped block's pages are faulted in and zeroed on first touch each time.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MAX_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)

_applied: int | None = None


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: mallopt's meaning is glibc's
        return libc
    except (OSError, AttributeError):
        return None


def user_set() -> bool:
    """The user already chose glibc's threshold (environment): leave it."""
    return ("MALLOC_MMAP_THRESHOLD_" in os.environ
            or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""))


def release_freed(threshold: int | None) -> int | None:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (None: leave the
    allocator as it is). Returns the threshold in force from zerofx, or None."""
    global _applied
    if threshold is None or user_set():
        return None
    if _applied == threshold:
        return threshold
    libc = _libc()
    if libc is None:
        log.info("zerofx: host_mmap_threshold applies to glibc's malloc only; this process "
                 "has another C library, its allocator is left as it is")
        return None
    if libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_MMAP_THRESHOLD, {threshold})")
    _applied = threshold
    return threshold
