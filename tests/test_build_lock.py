"""The kernel build's lock (zerofx/runtime/kernels.py): a build stopped by a signal leaves
torch's ``lock`` file in the extension's build directory, and torch then waits for it forever
with no output. A lock no live process holds is removed; one a live process holds is waited
for a bounded time, then one warning names it and the fix; SIGTERM (the launcher's Ctrl-C)
mid-build removes it. Each case runs in a subprocess with its own extension cache
(TORCH_EXTENSIONS_DIR), bounded in time, so a regression fails instead of hanging."""
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zerofx.runtime.fused_optim import load_kernels

_LOAD = ("import logging; logging.basicConfig(format='%(levelname)s %(message)s')\n"
         "from zerofx.runtime import kernels\n"
         "print('LOADED', kernels.load_kernels(), flush=True)\n")


def _built_dir() -> Path:
    """The build directory of the kernels conftest built: a copy of it loads in a second
    (ninja finds nothing to do), so these tests need no minute-long build."""
    assert load_kernels(), "the C++ kernels must build here for these tests"
    [lib] = [p for p in torch.ops.loaded_libraries if "zerofx_optim" in p]
    return Path(lib).parent


def _env(cache: Path, **extra) -> dict:
    return dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache),
                PYTHONPATH=os.pathsep.join(sys.path), **extra)


def _load_in_subprocess(env: dict, timeout_s: float):
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True,
                              env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"loading the kernels hung for {timeout_s} s on the lock "
                    f"(stderr: {e.stderr!r})")
    return proc, time.monotonic() - t0


def test_a_stale_build_lock_of_a_dead_process_is_removed_and_loading_proceeds(tmp_path):
    build = tmp_path / _built_dir().name
    shutil.copytree(_built_dir(), build)
    (build / "lock").touch()  # what a build killed mid-way leaves: no process holds it
    proc, took = _load_in_subprocess(_env(tmp_path), timeout_s=30)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED True" in proc.stdout, proc.stderr  # the C++ kernels, not the fallback
    assert not (build / "lock").exists()


@pytest.mark.slow  # waits on a real lock for seconds
def test_a_lock_a_live_process_holds_is_waited_for_a_bounded_time_then_named(tmp_path):
    build = tmp_path / _built_dir().name
    shutil.copytree(_built_dir(), build)
    (build / "lock").touch()
    with open(build / "zerofx-build.lock", "a+") as held:  # a live build in this process
        fcntl.flock(held, fcntl.LOCK_EX)
        proc, took = _load_in_subprocess(
            _env(tmp_path, ZEROFX_BUILD_LOCK_TIMEOUT_S="2"), timeout_s=30)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED False" in proc.stdout  # gave up and fell back to plain torch
    assert took < 30, took
    warning = proc.stderr
    assert str(build / "zerofx-build.lock") in warning, warning  # the lock, by path
    assert str(os.getpid()) in warning, warning  # who holds it
    assert "ZEROFX_BUILD_LOCK_TIMEOUT_S" in warning and "kill" in warning, warning  # the fix
    assert (build / "lock").exists()  # a live holder's lock is never taken from it


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (one this test started): ninja runs each
    compiler in a process group of its own, so killing the session's group is not enough."""
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[3]) == sid:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow  # waits on a real lock for seconds
def test_sigterm_during_a_build_leaves_no_lock(tmp_path):
    """The launcher stops ranks with SIGTERM, whose default action skips torch's
    ``finally`` that removes the lock: during a build it must unwind instead."""
    proc = subprocess.Popen([sys.executable, "-c", _LOAD], env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # so the compilers can be stopped too
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("*/lock")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        [lock] = list(tmp_path.glob("*/lock"))  # a fresh cache: the build has started
        time.sleep(0.5)  # inside the compiler's run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        _kill_session(proc.pid)  # the process and any compiler it left behind
        proc.wait()
    assert proc.returncode != 0
    assert not lock.exists(), err[-3000:]
