"""Running a launch plan: start the ranks (or one torchrun per host), watch, stop them all.

Rules that hold whatever goes wrong:

- the first child to exit non-zero decides the exit code; every other rank on every node is
  stopped within seconds (SIGTERM, then SIGKILL after a grace period);
- SIGINT/SIGTERM/SIGHUP to the launcher are forwarded, and it exits with 128 + signal;
- every child leads its own process group and is stopped with ``killpg`` plus a sweep of its
  descendants (:mod:`zerofx.tools.proc_tree`), so nothing is left behind;
- remote hosts are stopped by closing ssh's stdin: ``node_guard`` on the far side sees EOF
  and stops torchrun; the ssh client itself is killed only if that does not work in time.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time

from zerofx.tools import launch_plan, proc_tree
from zerofx.tools.launch_plan import LaunchPlan

log = logging.getLogger(__name__)

GRACE_S = 5.0
REACH_TIMEOUT_S = 15.0
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LaunchError(RuntimeError):
    """The launch cannot start (unreachable host, missing tool); one-line message."""


@dataclasses.dataclass
class Child:
    """One started process: a local rank or one host's ssh/pdsh session."""

    name: str  # "rank 3" or "worker-1 (node 1)"
    proc: subprocess.Popen
    pumps: list[threading.Thread] = dataclasses.field(default_factory=list)


def run(plan: LaunchPlan, *, environ: dict[str, str], gpu_ids: list[str]) -> int:
    """Run ``plan`` to completion; returns the launcher's exit code."""
    if plan.local:
        children = start_local_ranks(plan, environ=environ, gpu_ids=gpu_ids)
    else:
        if plan.launcher == "pdsh" and shutil.which("pdsh") is None:
            raise LaunchError("--launcher pdsh: pdsh is not installed; install it "
                              "(e.g. apt-get install pdsh) or use --launcher ssh")
        check_reachable(list(plan.world_info))
        children = start_hosts(plan, environ=environ)
    code = supervise(children)
    for child in children:
        for pump in child.pumps:
            pump.join(timeout=2.0)  # a leftover grandchild may hold the pipe; don't hang
    return code


def rank_env(environ: dict[str, str], *, rank: int, world_size: int, master_addr: str,
             master_port: int) -> dict[str, str]:
    """The environment torchrun gives a single-node rank."""
    env = dict(environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", MASTER_ADDR=master_addr,
               MASTER_PORT=str(master_port))
    # Like torchrun: N ranks each using every core would oversubscribe the machine.
    if world_size > 1 and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = "1"
    return env


def start_local_ranks(plan: LaunchPlan, *, environ: dict[str, str],
                      gpu_ids: list[str]) -> list[Child]:
    """Start every rank of the single local host, output prefixed with ``[rank N] ``."""
    (host, slots), = plan.world_info.items()
    # Each rank under node_guard, as on remote hosts: if this launcher is killed (even by
    # SIGKILL, which nothing can catch) the guard is orphaned and stops its rank at once,
    # instead of the rank running on unsupervised until it next writes to the dead pipe.
    argv = [sys.executable, "-u", "-m", "zerofx.tools.node_guard", "--", *plan.commands[host]]
    children: list[Child] = []
    for rank in range(len(slots)):
        env = rank_env(environ, rank=rank, world_size=len(slots),
                       master_addr=plan.master_addr, master_port=plan.master_port)
        if gpu_ids:  # slots index the GPUs this launcher can see
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids[s] for s in slots)
        # Rank 0 keeps a terminal's stderr: progress bars (tqdm) redraw in place there, which
        # a line-prefixing pipe would break up; its stdout is prefixed like every rank's.
        tty = rank == 0 and _is_tty(sys.stderr)
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE,
                                    stderr=None if tty else subprocess.PIPE,
                                    start_new_session=True)
        except OSError as e:
            proc_tree.stop([c.proc for c in children], grace=GRACE_S)
            raise LaunchError(f"cannot start rank {rank} ({argv[0]}): {e}") from None
        prefix = f"[rank {rank}] ".encode()
        pumps = [_pump(proc.stdout, sys.stdout, prefix)]
        if proc.stderr is not None:
            pumps.append(_pump(proc.stderr, sys.stderr, prefix))
        children.append(Child(f"rank {rank}", proc, pumps))
    return children


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (tests capture them)
        return False


def start_hosts(plan: LaunchPlan, *, environ: dict[str, str]) -> list[Child]:
    """Start one ssh/pdsh session per host; torchrun prefixes the ranks' lines itself."""
    children: list[Child] = []
    for node_rank, (host, argv) in enumerate(plan.commands.items()):
        # ssh: stdin stays an open pipe; closing it is how the remote side is told to stop.
        stdin = subprocess.PIPE if plan.launcher == "ssh" else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(argv, env=environ, stdin=stdin, start_new_session=True)
        except OSError as e:
            _stop_all(children, sig=signal.SIGTERM)
            raise LaunchError(f"cannot start {argv[0]} for {host}: {e}") from None
        children.append(Child(f"{host} (node {node_rank})", proc))
    return children


def _pump(stream, out, prefix: bytes) -> threading.Thread:
    """Copy ``stream`` to ``out`` line by line, each line prefixed; runs in a thread."""
    def copy() -> None:
        sink = getattr(out, "buffer", None)
        for line in iter(stream.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            with _OUTPUT_LOCK:
                try:
                    if sink is not None:
                        sink.write(prefix + line)
                    else:  # a text stream without a buffer (tests capturing output)
                        out.write((prefix + line).decode(errors="replace"))
                    out.flush()
                except (OSError, ValueError):
                    pass  # our own output is gone; keep draining so the rank never blocks
        stream.close()
    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


_OUTPUT_LOCK = threading.Lock()  # whole lines from different ranks never interleave


def supervise(children: list[Child], *, grace: float = GRACE_S) -> int:
    """Wait for all children; on the first failure or a signal, stop the rest."""
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum))
                for s in _FORWARDED}
    try:
        while True:
            if received:
                log.warning("received %s; stopping every rank", signal.Signals(received[0]).name)
                _stop_all(children, sig=received[0], grace=grace)
                return 128 + received[0]
            failed = next((c for c in children if c.proc.poll() not in (None, 0)), None)
            if failed is not None:
                code = _exit_code(failed.proc.returncode)
                log.error("%s exited with code %d; stopping the other ranks", failed.name, code)
                # The failed child too: its process group may hold leftovers of its own.
                _stop_all(children, sig=signal.SIGTERM, grace=grace)
                return code
            if all(c.proc.poll() == 0 for c in children):
                return 0
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _exit_code(returncode: int) -> int:
    return returncode if returncode > 0 else 128 - returncode  # killed by signal N: 128+N


def _stop_all(children: list[Child], *, sig: int, grace: float = GRACE_S) -> None:
    procs = [c.proc for c in children]
    piped = [p for p in procs if p.stdin is not None and p.poll() is None]
    for p in piped:
        try:
            p.stdin.close()  # EOF reaches node_guard, which stops torchrun on that host
        except OSError:
            pass
    if piped:
        proc_tree.wait_all(piped, timeout=2 * grace)
    proc_tree.stop(procs, sig=sig, grace=grace)


def check_reachable(hosts: list[str], *, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail, naming each host, unless ``ssh host true`` works on all of them (in parallel)."""
    procs = {h: subprocess.Popen(launch_plan.reachability_argv(h), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True) for h in hosts}
    deadline = time.monotonic() + timeout
    bad = []
    for host, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc_tree.stop([proc], soft=False)
            bad.append(f"{host} (no answer in {timeout:.0f} s)")
            continue
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            bad.append(f"{host} ({lines[-1] if lines else f'ssh exit {proc.returncode}'})")
    if bad:
        raise LaunchError(
            f"cannot reach {', '.join(bad)}; make 'ssh -o BatchMode=yes HOST true' work "
            "without a prompt (keys, ~/.ssh/config, hostfile names) or --exclude the host")
