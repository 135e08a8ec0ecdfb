"""Building and loading zerofx's C++/CUDA optimizer kernels (zerofx/csrc): JIT-compiled on
first use with torch.utils.cpp_extension, cached on disk; if that fails, the ops keep
working through their plain-torch fallback (runtime/optim_ops.py)."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import platform
import re
import signal
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_CPU_SOURCES = ("fused_adam.cpp", "fused_lamb.cpp", "grad_norm.cpp")
_CUDA_SOURCES = ("fused_adam.cu", "fused_lamb.cu")


def _isa_flags() -> tuple[str, list[str]]:
    """The vector ISA to build for, and its flags: ATen's vec headers key off CPU_CAPABILITY.

    Every x86 CPU torch runs with AVX2 or better gets the AVX2 build (the kernels are bound by
    memory bandwidth, so AVX-512 would add little); anything else gets portable code.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and capability.startswith("AVX"):
        return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2",
                        "-DCPU_CAPABILITY_AVX2"]
    return "default", ["-DCPU_CAPABILITY=DEFAULT"]


def _extension_name(cuda: bool) -> str:
    # The torch version is in the name: the extension cache is not keyed by it, and a library
    # built against another torch's headers must never be loaded.
    tag = re.sub(r"\W", "_", torch.__version__)
    sanitize = os.environ.get("ZEROFX_SANITIZE", "")
    return (f"zerofx_optim_{tag}_{_isa_flags()[0]}{'_cuda' if cuda else ''}"
            f"{'_' + re.sub(r'[^a-z]', '', sanitize) if sanitize else ''}")


def _build_and_load(sources: tuple[str, ...], *, cuda: bool) -> None:
    from torch.utils import cpp_extension

    _, isa_flags = _isa_flags()
    # ZEROFX_SANITIZE=address builds an AddressSanitizer copy (its own name in the cache) for
    # hunting memory errors; run with LD_PRELOAD=$(gcc -print-file-name=libasan.so) and
    # ASAN_OPTIONS=detect_leaks=0 (docs/design.md, "Heap checks").
    sanitize = os.environ.get("ZEROFX_SANITIZE", "")
    san_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []
    name = _extension_name(cuda)
    # torch's own choice of directory (TORCH_EXTENSIONS_DIR or its default), passed back to
    # it, so the lock zerofx guards is the one torch takes
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    with _build_lock(build_dir), _sigterm_unwinds():
        cpp_extension.load(
            name=name,
            sources=[str(_CSRC / s) for s in sources],
            # -ffp-contract=off: no silent FMAs, so the kernels round like the plain-torch
            # fallback. -fopenmp: at::parallel_for is inline OpenMP code, compiled into this
            # library.
            extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", *isa_flags, *san_flags],
            extra_ldflags=["-fopenmp", *san_flags],
            extra_cuda_cflags=["-O3", "--fmad=false"],  # likewise on the GPU
            extra_include_paths=[str(_CSRC)],
            build_directory=str(build_dir),
            is_python_module=False,  # the library only registers kernels with the dispatcher
        )


# torch's FileBaton marks a build with a `lock` file in the build directory and makes every
# other process wait while that file exists, forever and silently: a build killed mid-way
# (SIGKILL, or SIGTERM, whose default action skips torch's `finally`) left it for good. zerofx
# holds an flock on a file of its own for the whole build: the kernel drops it when its
# holder dies, so a process that gets it knows no live zerofx build owns torch's `lock`.
BUILD_LOCK = "zerofx-build.lock"
LOCK_TIMEOUT_S = 900.0  # a CUDA build takes minutes; ZEROFX_BUILD_LOCK_TIMEOUT_S overrides
LOCK_NOTE_S = 10.0  # waited this long: say for whom, so a wait is never silent


class BuildLockTimeout(RuntimeError):
    """Another live process held the kernel build's lock for longer than the timeout."""


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold zerofx's build lock of ``build_dir``, waiting a bounded time for a live holder,
    and remove torch's `lock` there once it is known stale."""
    path = build_dir / BUILD_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _acquire(fd, path):
            _remove_stale_torch_lock(build_dir)
        yield
    finally:
        os.close(fd)  # releases the flock (the file stays: unlinking a lock file races)


def _acquire(fd: int, path: Path) -> bool:
    """flock ``fd``; False where the filesystem has no flock (then torch's lock is left
    alone: nothing tells whether it is stale)."""
    timeout = float(os.environ.get("ZEROFX_BUILD_LOCK_TIMEOUT_S", LOCK_TIMEOUT_S))
    start, noted, pause = time.monotonic(), False, 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass  # a live process builds or loads these kernels now
        except OSError as e:
            log.debug("zerofx: no flock on %s (%s); building without zerofx's lock", path, e)
            return False
        waited = time.monotonic() - start
        if waited > timeout:
            raise BuildLockTimeout(
                f"zerofx kernels: waited {waited:.0f} s for the build lock {path}, held by "
                f"pid {_flock_holder(path)} (another process building or loading the same "
                f"kernels); let it finish, kill that pid if it is stuck (its lock goes with "
                f"it), or wait longer with ZEROFX_BUILD_LOCK_TIMEOUT_S=<seconds>")
        if not noted and waited > LOCK_NOTE_S:
            log.warning("zerofx kernels: waiting for pid %s, which holds the build lock %s",
                        _flock_holder(path), path)
            noted = True
        time.sleep(pause)
        pause = min(2 * pause, 0.5)


def _flock_holder(path: Path) -> str:
    """The pid holding an flock on ``path``, from /proc/locks (matched by inode)."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<ino> ..."
                if "FLOCK" in fields and int(fields[-3].rsplit(":", 1)[1]) == inode:
                    return fields[-4]
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _remove_stale_torch_lock(build_dir: Path) -> None:
    # Called holding zerofx's lock: every zerofx build of this directory holds it, so a
    # `lock` here was left by a process that died mid-build.
    stale = build_dir / "lock"
    try:
        stale.unlink()
    except FileNotFoundError:
        return
    log.warning("zerofx kernels: removed %s, left by a build that was stopped mid-way", stale)


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM (how zerofx-launch and torchrun stop ranks) raises SystemExit while building,
    so torch's `finally` removes its lock. Only in the main thread (where Python runs signal
    handlers) and only over the default action: a handler the program set is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, _frame):
        raise SystemExit(128 + signum)  # the exit status the signal would have given

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@functools.cache
def load_kernels() -> bool:
    """Build (first use; cached on disk) and load the C++/CUDA kernels. Idempotent.

    Returns True when the C++ kernels are in use. Otherwise logs one warning and returns
    False: the ops keep working through their plain-torch fallback.
    """
    attempts = [("cpu", _CPU_SOURCES)]
    if torch.version.cuda is not None:
        attempts.insert(0, ("cuda", _CPU_SOURCES + _CUDA_SOURCES))
    failures = []
    for variant, sources in attempts:
        try:
            _build_and_load(sources, cuda=variant == "cuda")
        # Any failure (no compiler, no ninja, a build error, a load error) means the same
        # thing to the caller: fall back to plain torch.
        except Exception as e:  # noqa: BLE001
            failures.append(f"{variant}: {type(e).__name__}: {str(e).strip()[-2000:]}")
            continue
        if failures:
            log.warning("zerofx: CUDA optimizer kernels unavailable, CUDA tensors use the "
                        "plain-torch fallback (%s)", failures[0])
        return True
    log.warning("zerofx: fused optimizer kernels could not be built or loaded; using the "
                "plain-torch fallback of the same ops (slower). %s", "; ".join(failures))
    return False
