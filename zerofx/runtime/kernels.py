"""Building and loading zerofx's C++/CUDA optimizer kernels (zerofx/csrc): JIT-compiled on
first use with torch.utils.cpp_extension, cached on disk; if that fails, the ops keep
working through their plain-torch fallback (runtime/optim_ops.py)."""
from __future__ import annotations

import functools
import logging
import os
import platform
import re
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


def _build_and_load(sources: tuple[str, ...], *, cuda: bool) -> None:
    from torch.utils import cpp_extension

    isa, isa_flags = _isa_flags()
    # The torch version is in the name: the extension cache is not keyed by it, and a library
    # built against another torch's headers must never be loaded.
    tag = re.sub(r"\W", "_", torch.__version__)
    # ZEROFX_SANITIZE=address builds an AddressSanitizer copy (its own name in the cache) for
    # hunting memory errors; run with LD_PRELOAD=$(gcc -print-file-name=libasan.so) and
    # ASAN_OPTIONS=detect_leaks=0 (docs/design.md, "Heap checks").
    sanitize = os.environ.get("ZEROFX_SANITIZE", "")
    san_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []
    cpp_extension.load(
        name=f"zerofx_optim_{tag}_{isa}{'_cuda' if cuda else ''}"
             f"{'_' + re.sub(r'[^a-z]', '', sanitize) if sanitize else ''}",
        sources=[str(_CSRC / s) for s in sources],
        # -ffp-contract=off: no silent FMAs, so the kernels round like the plain-torch fallback.
        # -fopenmp: at::parallel_for is inline OpenMP code, compiled into this library.
        extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", *isa_flags, *san_flags],
        extra_ldflags=["-fopenmp", *san_flags],
        extra_cuda_cflags=["-O3", "--fmad=false"],  # likewise on the GPU
        extra_include_paths=[str(_CSRC)],
        is_python_module=False,  # the library only registers kernels with the dispatcher
    )


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
