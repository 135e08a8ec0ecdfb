"""File-backed tensors: whole copies of an NVMe-offloaded state that need not fit in memory.

    whole = scratch_tensors(nvme_path, {"master": n, "exp_avg": n}, rank=0)

A checkpoint save, a load and ``optimizer.state_dict()`` need the offloaded state as whole
tensors (torch.save writes tensors; a load assembles the saved shards by name). Allocated in
memory, a state larger than memory would have the kernel kill the process halfway. These
tensors are instead shared mappings of private files (created as the state's own file is,
offload/files.py: a fresh 0700 directory, ``O_EXCL | O_NOFOLLOW``, mode 0600, preallocated
so a full disk fails here naming the path, then unlinked): their pages are the kernel's page
cache, written back and dropped under memory pressure, so filling them and torch.save-ing
them streams through memory. The file's space returns when the last tensor viewing it is
freed, or when the process ends, however it ends.
"""
from __future__ import annotations

import torch

from zerofx.runtime.offload.files import StateFile

# What the file is, for offload/files.py's messages: its name, the config block, a suffix.
SCRATCH = ("optimizer state's staging copy (checkpoints, state_dict)", "offload_optimizer",
           "staging")


def scratch_tensors(root: str, numels: dict[str, int], *, rank: int,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{name: a zero-filled 1-D ``dtype`` tensor of numels[name] elements}, each backed by an
    unlinked file of its own under ``root`` (see the module doc)."""
    item = torch.empty((), dtype=dtype).element_size()
    # a file each: a tensor saved alone (torch.save writes a view's whole storage) is itself
    return {name: _mapped(root, n, item, dtype, rank) for name, n in numels.items()}


def _mapped(root: str, n: int, item: int, dtype: torch.dtype, rank: int) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, dtype=dtype)
    file = StateFile.create(root, n * item, rank=rank, block_size=1 << 20, role=SCRATCH)
    try:
        # the unlinked file, reopened through this process's descriptor table: a shared
        # mapping writes back to it (a private one would turn every written page anonymous)
        return torch.from_file(f"/proc/self/fd/{file.fd}", shared=True, size=n, dtype=dtype)
    finally:
        file.close()  # the mapping keeps the data alive until the tensor is freed
