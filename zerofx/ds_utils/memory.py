"""``deepspeed.utils.see_memory_usage``: print the device's and the host's memory use.

DeepSpeed's (it lives in ``deepspeed.runtime.utils`` and scripts import it from there or
from ``deepspeed.utils``): nothing unless ``force``; rank 0 only; the accelerator's
allocated / peak / reserved bytes (zero on a CPU-only run, where the accelerator has no
allocator statistics), then the host's used memory; the peak counter is reset after.
"""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

from zerofx.runtime.host_memory import meminfo

GB = 1024 ** 3


def see_memory_usage(message, force: bool = False) -> None:
    if not force:
        return
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    gc.collect()  # what Python still holds would count as used
    cuda = torch.cuda.is_available()
    allocated = torch.cuda.memory_allocated() if cuda else 0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    reserved = torch.cuda.memory_reserved() if cuda else 0
    peak_reserved = torch.cuda.max_memory_reserved() if cuda else 0
    print(message)
    print(f"MA {allocated / GB:.2f} GB         Max_MA {peak / GB:.2f} GB         "
          f"CA {reserved / GB:.2f} GB         Max_CA {peak_reserved / GB:.0f} GB ")
    used, total = _host_memory()
    print(f"CPU Virtual Memory:  used = {used / GB:.2f} GB, percent = "
          f"{100.0 * used / total if total else 0.0:.1f}%")
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _host_memory() -> tuple[int, int]:
    """(used, total) bytes of host memory, as psutil's virtual_memory counts them
    (total - available), from /proc/meminfo (no psutil dependency)."""
    fields = meminfo() or {}
    if "MemTotal" in fields and "MemAvailable" in fields:
        return fields["MemTotal"] - fields["MemAvailable"], fields["MemTotal"]
    return 0, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
