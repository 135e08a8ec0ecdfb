"""Stopping a child and everything it started, leaving nothing behind.

Children are started with ``start_new_session=True``, so each is the leader of its own
process group and ``killpg`` reaches what it forked. A process that made its own session
(torchrun's workers do) escapes the group, so :func:`stop` also snapshots the descendants
from ``/proc`` before signalling and kills any that outlive the grace period.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

log = logging.getLogger(__name__)


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        # The command name is in parentheses and may contain spaces: parse after the last ')'.
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """True when ``pid`` runs and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True  # no /proc: trust kill(0)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads; quiet if it is already gone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_all(procs: list[subprocess.Popen], *, timeout: float) -> bool:
    """Poll until every process exited or ``timeout`` passed; True if all exited."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop(procs: list[subprocess.Popen], *, sig: int = signal.SIGTERM, grace: float = 5.0,
         soft: bool = True) -> None:
    """Stop ``procs`` and their descendants: ``sig`` (when ``soft``), then SIGKILL after
    ``grace`` seconds. Each proc must lead its own process group."""
    tree = [pid for p in procs if p.poll() is None for pid in descendants(p.pid)]
    if soft:
        for p in procs:
            signal_group(p, sig)
        wait_all(procs, timeout=grace)
    for p in procs:
        signal_group(p, signal.SIGKILL)  # the group may outlive its leader
    for pid in tree:
        if is_alive(pid):
            log.debug("killing leftover process %d", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    wait_all(procs, timeout=grace)
