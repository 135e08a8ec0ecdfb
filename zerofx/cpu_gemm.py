"""How this host's CPU should compute a bf16/fp16 matmul: natively, or via fp32.

A CPU without native low-precision GEMM instructions runs a bf16 GEMM 5-50x slower than the
same product in fp32 (an AVX2-only EPYC: [16,2048]@[2048,512] 44 ms in bf16, 1.2 ms via fp32);
one with them (AVX512-BF16 or AMX) runs it 2-5x faster natively (a Sapphire Rapids-class
Xeon: 0.11 ms vs 0.40 ms). Both forms give the same products (bf16 x bf16 is exact in fp32;
each accumulates in fp32 and rounds once), in another summation order.

The form is a rule over the CPU's instruction sets, never a timing: timing at compile time
made two ranks, or two runs, compile different programs (a matmul one ulp apart), and cost
minutes on a BERT. The runtime decides once on rank 0 and every rank uses rank 0's forms.
"""
from __future__ import annotations

import torch

FORMS = ("native", "fp32")
# dtype -> instruction sets, any of which gives oneDNN a native GEMM for it
_NATIVE_ISA = {torch.bfloat16: ("avx512_bf16", "amx_bf16"),
               torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags, as torch reports them (torch.cpu.get_capabilities,
    torch >= 2.11) or, failing that, as Linux lists them in /proc/cpuinfo."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        try:
            return {k for k, v in caps().items() if v is True}
        except Exception:  # an unusual CPU torch cannot describe: read the kernel's list
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_forms(pinned: str = "host") -> tuple[tuple[str, str], ...]:
    """((dtype name, form), ...) for bf16 and fp16 on this host; ``pinned`` ("native" or
    "fp32", the config's zerofx.matmul_form) overrides the rule for both."""
    flags = cpu_flags()
    out = []
    for dtype, isa in _NATIVE_ISA.items():
        form = pinned if pinned != "host" else ("native" if flags & set(isa) else "fp32")
        out.append((str(dtype).removeprefix("torch."), form))
    return tuple(out)


def describe(forms: tuple[tuple[str, str], ...], *, source: str) -> str:
    """One line for plan.txt and logs: which form each dtype's CPU matmuls take, and why."""
    return "CPU matmuls: " + ", ".join(f"{d} {f}" for d, f in forms) + f" ({source})"
