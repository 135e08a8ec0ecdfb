"""One clear message per problem on a multi-rank run, printed by the rank that found it.

Every rank usually meets the same config or model error at the same moment; Python would
print N interleaved tracebacks of ~60 lines each. For zerofx's own errors (the ones whose
message already names the culprit and the fix) an excepthook prints ``zerofx: <message>``
once: ranks claim each distinct message in the process group's store, and only the first
claimant prints it. Anything else keeps Python's traceback (it is a bug to be reported).
Set ZEROFX_TRACEBACK=1 to see full tracebacks of zerofx errors too.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from datetime import timedelta

_INSTALLED = []


def zerofx_error(exc: BaseException | None) -> BaseException | None:
    """The zerofx error behind ``exc`` (Dynamo wraps backend errors), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__module__.split(".")[0] == "zerofx":
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return None


def _first_to_claim(message: str, rank: int) -> bool:
    """Whether this rank is the first to report ``message`` (True if no store answers)."""
    try:
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=2))  # rank 0 (the store's host) may be gone
        key = "zerofx_error/" + hashlib.sha1(message.encode()).hexdigest()
        first = store.add(key, 1) == 1
        done = store.add("zerofx_error/reported", 1)
        if rank == 0:  # the store lives in rank 0: let the others claim before it exits
            deadline = time.monotonic() + 2.0
            while done < dist.get_world_size() and time.monotonic() < deadline:
                time.sleep(0.05)
                done = store.add("zerofx_error/reported", 0)
        return first
    except Exception:  # noqa: BLE001 - reporting must never hide the error itself
        return True


def _hook(rank: int, previous):
    def report(kind, exc, tb):
        found = zerofx_error(exc)
        if found is None or os.environ.get("ZEROFX_TRACEBACK") == "1":
            return previous(kind, exc, tb)
        message = f"{type(found).__name__}: {found}"
        if _first_to_claim(message, rank):
            print(f"zerofx: error (rank {rank}): {message}", file=sys.stderr, flush=True)
    return report


def install(rank: int) -> None:
    """Install the excepthook once per process (called when the process group forms)."""
    if _INSTALLED:
        return
    _INSTALLED.append(True)
    sys.excepthook = _hook(rank, sys.excepthook)
