"""Remote side of a multi-node launch: run one command, and stop it when the launcher goes.

    python -m zerofx.tools.node_guard [--watch-stdin] -- python -m torch.distributed.run ...

sshd does not signal a non-tty command when the connection drops, so without this wrapper a
failed or interrupted launch would leave torchrun and its ranks running on the other hosts.
The guard stops the command (and every descendant) when:

- its stdin reaches EOF (``--watch-stdin``: the launcher holds ssh's stdin open and closes
  it to stop the host; EOF also comes when the launcher or the connection dies);
- it is orphaned (its parent, sshd or pdsh's remote end, went away);
- it receives SIGTERM, SIGINT or SIGHUP.

It exits with the command's exit code, or 128 + signal when it stopped the command.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading

from zerofx.tools import proc_tree

log = logging.getLogger(__name__)

POLL_S = 0.2
GRACE_S = 10.0  # torchrun needs a moment to stop its workers cleanly on SIGTERM


def _watch_stdin(stop: threading.Event) -> None:
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass  # the launcher never writes; anything read is ignored
    except OSError:
        pass
    stop.set()


def guard(command: list[str], *, watch_stdin: bool, poll: float = POLL_S,
          grace: float = GRACE_S) -> int:
    """Run ``command`` in its own session until it exits or the guard is told to stop."""
    parent = os.getppid()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # The command gets no stdin: it must not consume the EOF the guard is waiting for.
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    if watch_stdin:
        threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    while child.poll() is None:
        if stop.wait(poll) or os.getppid() != parent:
            why = signal.Signals(received[0]).name if received else "launcher gone"
            log.warning("node_guard: %s; stopping %s", why, os.path.basename(command[0]))
            proc_tree.stop([child], sig=signal.SIGTERM, grace=grace)
            return 128 + (received[0] if received else signal.SIGTERM)
    rc = child.returncode
    return rc if rc >= 0 else 128 - rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zerofx.tools.node_guard",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--watch-stdin", action="store_true",
                        help="stop the command when stdin reaches EOF")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run, after '--'")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; usage: node_guard [--watch-stdin] -- COMMAND ...")
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        return guard(command, watch_stdin=args.watch_stdin)
    except OSError as e:
        print(f"node_guard: cannot start {command[0]}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
