"""Run a test body on N real processes with gloo, bounded in time, failures shown per rank.

    results = run_ranks(body, world_size=2, args=(...,))   # body(rank, world_size, *args)

Each rank is a fresh process, forked from a server that imported torch, zerofx and
transformers once (``rank_preload``), with the torchrun environment set (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT on a free port), so the code under test bootstraps exactly as under
zerofx-launch. The body must be a module-level function (it is pickled by name). Results
come back in rank order; if any rank raises or the time bound passes, the others are killed
and the AssertionError names the failing rank and shows its traceback.

A rank killed by a signal (SIGABRT/SIGSEGV) fails the test at once with that rank's stderr
tail (faulthandler's stacks and glibc's message): there is no rerun. The heap-corruption
aborts once seen about once per suite run were torch's gloo coalesced all-gather
(docs/design.md "Heap checks"; passes/gather_out.py keeps it out of zerofx's graphs): a crash
now is a defect to report, not noise to retry.
"""
from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import queue
import shutil
import socket
import tempfile
import time
import traceback

DEFAULT_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(body, rank, world_size, port, args, env, results, timeout_s=None,
               log_path=None):
    # A crash (SIGSEGV/SIGABRT) or a hang prints every thread's Python stack to stderr.
    # stderr (fd 2, so glibc's and faulthandler's C-level writes too) goes to this rank's own
    # file, whose tail the parent puts into the failure: the rank that died says where.
    if log_path is not None:
        log = open(log_path, "w", buffering=1)
        os.dup2(log.fileno(), 2)
    faulthandler.enable()
    if timeout_s:
        faulthandler.dump_traceback_later(max(1.0, timeout_s - 5), exit=False)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # Two cores for N ranks: more intra-op threads only oversubscribe and slow every rank.
    import torch

    torch.set_num_threads(1)
    try:
        # torch.save bytes, not the Queue's pickling: tensors would travel as shared-memory
        # handles that die with this process before the parent reads them.
        buf = io.BytesIO()
        torch.save(body(rank, world_size, *args), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RankKilled(AssertionError):
    """A rank died by a signal before reporting."""


def run_ranks(body, world_size: int, *, args: tuple = (), env: dict | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S, fresh: bool = False) -> list:
    """Run ``body(rank, world_size, *args)`` on ``world_size`` processes; return results.
    ``fresh``: spawned ranks that import only what they use, for benchmarks that measure a
    rank's memory (the forked ones share the server's preloaded libraries)."""
    return _run_once(body, world_size, args, env, timeout_s, fresh)


# Ranks fork from a server that imported these once (torch, zerofx, transformers' model code
# and the C++ kernels: about 2 s per rank when each rank imports them itself, a third of a
# small multi-rank test). The server runs no torch code, so no thread pool is forked.
_PRELOAD = ["rank_preload"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    # Python 3.11's server ignores the parent's sys.path (fixed in 3.12): the preload module
    # sits beside this file, so the server starts with this folder on PYTHONPATH.
    from multiprocessing import forkserver

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), old]))
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return ctx


def _run_once(body, world_size, args, env, timeout_s, fresh=False) -> list:
    ctx = mp.get_context("spawn") if fresh else _context()
    results = ctx.Queue()
    port = free_port()
    logdir = tempfile.mkdtemp(prefix="zerofx-ranks-")
    logs = [os.path.join(logdir, f"rank{r}.stderr") for r in range(world_size)]
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(body, r, world_size, port, args, dict(env or {}), results,
                               timeout_s, logs[r]))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results, world_size, timeout_s)
    except AssertionError as e:
        e.args = (f"{e.args[0] if e.args else e}{_stderr_tails(procs, logs)}",)
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        shutil.rmtree(logdir, ignore_errors=True)


def _stderr_tails(procs, logs, chars: int = 3000) -> str:
    """The end of the stderr of every rank that died or hung (faulthandler's stacks)."""
    out = []
    for r, (p, path) in enumerate(zip(procs, logs)):
        if p.exitcode == 0:
            continue
        try:
            with open(path, errors="replace") as f:
                whole = f.read()
        except OSError:
            continue
        text = whole[-chars:]
        # what killed it (a C++ "terminate called ..." or an assertion) is printed just
        # before faulthandler's "Fatal Python error" and its thread stacks, which alone can
        # fill the tail
        fatal = whole.find("Fatal Python error")
        if 0 <= fatal < len(whole) - chars:
            out.append(f"\n--- rank {r} stderr before its fatal error ---\n"
                       f"{whole[max(0, fatal - 1500):fatal + 200]}")
        if text.strip():
            out.append(f"\n--- rank {r} stderr (exit code {p.exitcode}), last {chars} chars "
                       f"---\n{text}")
    return "".join(out)


def _collect(procs, results, world_size, timeout_s) -> list:
    deadline = time.monotonic() + timeout_s
    got: dict[int, object] = {}
    while len(got) < world_size:
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(range(world_size)) - set(got))
            raise AssertionError(f"ranks {missing} of {world_size} did not finish within "
                                 f"{timeout_s:.0f} s (hung collective?)")
        try:
            rank, status, value = results.get(timeout=min(left, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None) and r not in got]
            if dead:
                code = procs[dead[0]].exitcode
                raise (RankKilled if code < 0 else AssertionError)(
                    f"rank {dead[0]} of {world_size} died with exit code {code} before "
                    f"reporting")
            continue
        if status == "error":
            report = _failure_report(procs, results, world_size, rank, value)
            # a peer's "connection reset" is only the echo of a rank killed by a signal
            killed = any(p.exitcode is not None and p.exitcode < 0 and r not in got
                         for r, p in enumerate(procs))
            raise (RankKilled if killed else AssertionError)(report)
        import torch

        got[rank] = torch.load(io.BytesIO(value), weights_only=False)
    return [got[r] for r in range(world_size)]


def _failure_report(procs, results, world_size, rank, value, *, grace_s: float = 3.0) -> str:
    """The first failure, plus what the other ranks say or how they died within a moment:
    a rank's "connection reset" is often only the echo of another rank's real error."""
    report = [f"rank {rank} of {world_size} failed:\n{value}"]
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            other, status, text = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if status == "error":
            report.append(f"rank {other} of {world_size} failed too:\n{text}")
    report += [f"rank {r} exited with code {p.exitcode} without reporting"
               for r, p in enumerate(procs)
               if r != rank and not p.is_alive() and p.exitcode not in (0, None)]
    return "\n".join(report)
