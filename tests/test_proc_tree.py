"""Stopping a process tree without leftovers (tools/proc_tree.py)."""
import os
import signal
import subprocess
import sys
import time

from zerofx.tools import proc_tree

# A child that starts a grandchild in its own session (as torchrun's workers are), prints
# the grandchild's pid, and waits. killpg on the child's group cannot reach the grandchild.
TREE = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                     start_new_session=True)
print(g.pid, flush=True)
time.sleep(60)
"""


def start_tree():
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE,
                            start_new_session=True)
    grandchild = int(proc.stdout.readline())
    return proc, grandchild


def test_descendants_and_stop_reach_a_grandchild_in_another_session():
    proc, grandchild = start_tree()
    try:
        assert grandchild in proc_tree.descendants(proc.pid)
        start = time.monotonic()
        proc_tree.stop([proc], grace=5.0)
        assert time.monotonic() - start < 5.0  # SIGTERM is enough for the child
        assert proc.returncode == -signal.SIGTERM
        deadline = time.monotonic() + 5
        while proc_tree.is_alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proc_tree.is_alive(grandchild)
    finally:
        for pid in (proc.pid, grandchild):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def test_stop_escalates_to_sigkill_after_grace():
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", ignore], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout.readline() == b"ready\n"
    proc_tree.stop([proc], grace=0.5)
    assert proc.returncode == -signal.SIGKILL


def test_is_alive():
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    assert not proc_tree.is_alive(proc.pid)
    assert proc_tree.is_alive(os.getpid())
