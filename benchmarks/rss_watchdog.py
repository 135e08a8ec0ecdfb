"""A memory budget for a group of processes: start them, sample the sum of their process
trees' resident memory every few milliseconds, kill them all past the budget (what
benchmarks/bench_largest.py counts as "does not fit")."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time

GIB = float(1 << 30)


def _tree(pid: int) -> list[int]:
    """pid and its descendants (compile workers, I/O helpers count against the budget)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def _private_bytes(pid: int) -> int:
    """The pages only ``pid`` holds (USS): a forked helper (py-cpuinfo's CPUID probe in
    DeepSpeed's op builder) shares its parent's pages copy-on-write, which its RSS would
    count a second time."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def rss_bytes(pid: int) -> int:
    """What ``pid``'s process tree holds: its resident set (VmRSS: what the kernel charges
    it) and its descendants' private pages (a compiler's memory, not its shared pages)."""
    tree = _tree(pid)
    total = 0
    for p in tree:
        try:
            if p == pid:
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            else:
                total += _private_bytes(p)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def run_watched(cmds, envs, budget_bytes: int, timeout_s: float, interval_s: float = 0.05):
    """Start one process per command (each its own session), sample the sum of their
    trees' RSS every ``interval_s``; past ``budget_bytes`` or ``timeout_s`` kill them all.
    Returns {"ok", "reason", "peak" (the largest sum sampled), "codes"}."""
    procs = [subprocess.Popen(c, env=e, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for c, e in zip(cmds, envs)]
    errs = [tempfile.TemporaryFile() for _ in procs]
    peak, reason, t0 = 0, None, time.monotonic()
    # drain stderr (a full pipe would block a rank)
    drains = [threading.Thread(target=lambda p=p, f=f: f.write(p.stderr.read()), daemon=True)
              for p, f in zip(procs, errs)]
    for t in drains:
        t.start()
    while any(p.poll() is None for p in procs):
        total = sum(rss_bytes(p.pid) for p in procs if p.poll() is None)
        peak = max(peak, total)
        if total > budget_bytes:
            reason = f"memory: RSS {total / GIB:.2f} GiB > budget {budget_bytes / GIB:.2f} GiB"
        elif time.monotonic() - t0 > timeout_s:
            reason = f"timeout: over {timeout_s:.0f} s"
        elif any(p.poll() for p in procs):  # a rank failed: its peer would wait for ever
            reason = ""
        if reason is not None:
            _kill(procs)
            break
        time.sleep(interval_s)
    codes = [p.wait() for p in procs]
    for t in drains:
        t.join(timeout=5)
    if not reason and any(codes):
        bad = max(range(len(codes)), key=lambda i: codes[i])  # a failure, not the killed
        errs[bad].seek(0)
        tail = errs[bad].read().decode(errors="replace").strip().splitlines()[-3:]
        reason = f"rank {bad} exit {codes[bad]}: " + " | ".join(tail)[-400:]
    return {"ok": not reason and not any(codes), "reason": reason, "peak": peak, "codes": codes}


def _kill(procs) -> None:
    """SIGKILL each rank's whole tree: its session's group, and every descendant by pid
    (a build tool's jobs sit in groups of their own)."""
    for p in procs:
        if p.poll() is None:
            tree = _tree(p.pid)
            for kill, target in [(os.killpg, p.pid)] + [(os.kill, q) for q in tree]:
                try:
                    kill(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
