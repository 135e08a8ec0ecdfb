"""The remote-side guard that stops torchrun when the launcher goes (tools/node_guard.py)."""
import subprocess
import sys
import time

import pytest

from zerofx.tools import proc_tree

GUARD = [sys.executable, "-m", "zerofx.tools.node_guard"]
# Prints its pid, then sleeps: stands in for torchrun.
SLEEPER = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"]


def wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc_tree.is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_exit_code_passes_through():
    done = subprocess.run(GUARD + ["--", sys.executable, "-c", "raise SystemExit(7)"],
                          stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == 7


def test_stdin_eof_stops_the_command():
    guard = subprocess.Popen(GUARD + ["--watch-stdin", "--"] + SLEEPER, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        child = int(guard.stdout.readline())
        guard.stdin.close()  # what the launcher does to stop a host
        assert guard.wait(timeout=15) == 128 + 15
        assert wait_dead(child, 5)
        assert b"launcher gone" in guard.stderr.read()
    finally:
        guard.kill()
        guard.wait(timeout=10)


def test_orphaned_guard_stops_the_command():
    # sh starts the guard in the background and exits after a second: the guard's parent is
    # gone, as when sshd goes away with a dropped connection.
    script = f"{subprocess.list2cmdline(GUARD + ['--'] + SLEEPER)} & sleep 1"
    sh = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, start_new_session=True)
    try:
        child = int(sh.stdout.readline())
        assert sh.wait(timeout=15) == 0
        assert wait_dead(child, 5)
    finally:
        proc_tree.stop([sh], soft=False)


def test_no_command_is_a_usage_error():
    done = subprocess.run(GUARD + ["--"], capture_output=True, timeout=30)
    assert done.returncode == 2 and b"no command given" in done.stderr


@pytest.mark.parametrize("sig", [15, 2])
def test_signal_stops_the_command(sig):
    guard = subprocess.Popen(GUARD + ["--"] + SLEEPER, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        child = int(guard.stdout.readline())
        guard.send_signal(sig)
        assert guard.wait(timeout=15) == 128 + sig
        assert wait_dead(child, 5)
    finally:
        guard.kill()
        guard.wait(timeout=10)
