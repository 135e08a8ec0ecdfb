"""InitStore: the parameters a model creates inside ``zero.Init(remote_device="nvme")``, each
in a private file mapped into memory (zerofx/zero.py is the user's side).

    store = InitStore(nvme_path, block="offload_param", dtype=torch.bfloat16, rank=0)
    store.adopt(param)            # param.data now lives in a file-backed mapping
    store.is_adopted(param)

A parameter's values move, when the module registers it, into a file made the way the
offloaded state's are (offload/files.py: a fresh 0700 directory, created exclusively, mode
0600, never through a symlink, preallocated so that a full disk fails here and names the
path, then unlinked) and mapped shared (``torch.from_file`` on ``/proc/self/fd/<fd>``: the
unlinked file, never a name anyone else could swap). The values stay ordinary addressable
CPU tensors, so everything that reads a model (tensor-parallel discovery, the rank-0
broadcast, the plan, ParamCarriers.install) works unchanged, but the whole model is page
cache the kernel can write back and reclaim, not anonymous memory: building a model larger
than memory needs about one parameter of anonymous memory at a time.

No file has a name after ``adopt`` returns; its disk space is returned when the last tensor
that maps it is freed (ParamCarriers.install drops the partitioned parameters' storage; a
process that dies frees everything). Writing through a mapping cannot fail for lack of space
(the blocks are reserved); an I/O error of the disk itself would arrive as SIGBUS, as for any
mapped file.
"""
from __future__ import annotations

import logging
import weakref

import torch

from zerofx.runtime.offload.files import OffloadError, StateFile

log = logging.getLogger(__name__)

_BLOCK = 1 << 20  # StateFile's pread/pwrite size; the mapping itself is not read that way


def role(block: str) -> tuple[str, str, str]:
    """The files' role for offload/files.py's messages: what, config block, suffix."""
    return ("parameters built under zero.Init", block, "init")


class InitStore:
    """File-backed storage for parameters created inside zero.Init (see the module doc)."""

    def __init__(self, root: str, *, block: str, dtype: torch.dtype | None, rank: int):
        """``dtype``: floating-point parameters are cast to it as they are adopted (None:
        kept); ``block``: the config block whose nvme_path ``root`` is (for messages)."""
        self.root, self.dtype, self.rank = root, dtype, rank
        self.role = role(block)
        self.files = 0  # counters, for logs and tests
        self.bytes = 0
        # param -> the storage address it was given: a parameter whose data the model
        # replaced later no longer matches, and is adopted again
        self._adopted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def is_adopted(self, param: torch.Tensor) -> bool:
        ptr = self._adopted.get(param)
        return ptr is not None and ptr == param.data.untyped_storage().data_ptr()

    def adopt(self, param: torch.Tensor) -> None:
        """Move ``param``'s values into a file-backed mapping, in place (``param.data``):
        the object, its attributes and its registrations stay. Meta, device and empty
        tensors are left as they are (nothing of them is in host memory)."""
        t = param.data
        if t.device.type != "cpu" or t.numel() == 0 or self.is_adopted(param):
            return
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        mapped = self.allocate(t.numel(), dtype).view(t.shape)
        with torch.no_grad():
            mapped.copy_(t)
        param.data = mapped
        self._adopted[param] = mapped.untyped_storage().data_ptr()

    def allocate(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements mapped from a new private file (zeros)."""
        nbytes = numel * dtype.itemsize
        f = StateFile.create(self.root, nbytes, rank=self.rank, block_size=_BLOCK,
                             role=self.role)
        try:
            out = torch.from_file(f"/proc/self/fd/{f.fd}", shared=True, size=numel,
                                  dtype=dtype)
        except RuntimeError as e:  # mmap refused (address space, map count)
            raise OffloadError(f"{self.role[0]}: mapping {f.path} ({nbytes} bytes) failed: "
                               f"{e}; check ulimit -v and vm.max_map_count") from None
        finally:
            f.close()  # the mapping keeps the file; it has no name since create
        self.files += 1
        self.bytes += nbytes
        return out


def is_file_backed(t: torch.Tensor) -> str | None:
    """The file (as /proc/self/maps names it) whose shared mapping holds ``t``'s storage,
    or None for anonymous memory: what a test or a log can check independently of any
    flag this module sets."""
    if t.device.type != "cpu" or t.untyped_storage().nbytes() == 0:
        return None
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                shared = parts[1].endswith("s")
                return parts[5].strip() if shared and len(parts) == 6 else None
    return None
