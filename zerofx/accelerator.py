"""DeepSpeed's accelerator object: ``get_accelerator()`` and the methods scripts call on it.

DeepSpeed's examples write device code through it (33 files of DeepSpeedExamples import
``deepspeed.accelerator.get_accelerator``): ``get_accelerator().device_name()``,
``.current_device_name()``, ``.communication_backend_name()``, ``.pin_memory(t)``... zerofx
answers with torch's CUDA device when one is there and the CPU otherwise, with DeepSpeed's
CUDA and CPU accelerators' meanings (its CPU accelerator without oneCCL: backend gloo).
"""
from __future__ import annotations

import os

import torch


class Accelerator:
    """One accelerator kind, "cuda" or "cpu", as DeepSpeed's CUDA_/CPU_Accelerator."""

    def __init__(self, kind: str):
        self._name = kind

    def _cuda(self) -> bool:
        return self._name == "cuda"

    def is_synchronized_device(self) -> bool:
        return not self._cuda()

    # ---- devices ---------------------------------------------------------------------------
    def device_name(self, device_index=None) -> str:
        if not self._cuda():
            return "cpu"
        return "cuda" if device_index is None else f"cuda:{device_index}"

    def device(self, device_index=None):
        return torch.cuda.device(device_index) if self._cuda() else None

    def set_device(self, device_index) -> None:
        if self._cuda():
            torch.cuda.set_device(device_index)

    def current_device(self) -> int:
        return torch.cuda.current_device() if self._cuda() \
            else int(os.environ.get("LOCAL_RANK", 0))

    def current_device_name(self) -> str:
        return f"cuda:{torch.cuda.current_device()}" if self._cuda() else "cpu"

    def device_count(self) -> int:
        return torch.cuda.device_count() if self._cuda() else 1

    def is_available(self) -> bool:
        return torch.cuda.is_available() if self._cuda() else True

    def synchronize(self, device_index=None) -> None:
        if self._cuda():
            torch.cuda.synchronize(device_index)

    def communication_backend_name(self) -> str:
        return "nccl" if self._cuda() else "gloo"

    # ---- RNG -------------------------------------------------------------------------------
    def random(self):
        return torch.random

    def manual_seed(self, seed: int) -> None:
        if self._cuda():
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        if self._cuda():
            torch.cuda.manual_seed_all(seed)
        else:
            torch.manual_seed(seed)

    def initial_seed(self) -> int:
        return torch.cuda.initial_seed() if self._cuda() else torch.initial_seed()

    def get_rng_state(self, device_index=None):
        return torch.cuda.get_rng_state(device_index or "cuda") if self._cuda() \
            else torch.get_rng_state()

    def set_rng_state(self, new_state, device_index=None) -> None:
        if self._cuda():
            torch.cuda.set_rng_state(new_state, device_index or "cuda")
        else:
            torch.set_rng_state(new_state)

    # ---- memory ----------------------------------------------------------------------------
    def empty_cache(self) -> None:
        if self._cuda():
            torch.cuda.empty_cache()

    def memory_allocated(self, device_index=None) -> int:
        return torch.cuda.memory_allocated(device_index) if self._cuda() else 0

    def max_memory_allocated(self, device_index=None) -> int:
        return torch.cuda.max_memory_allocated(device_index) if self._cuda() else 0

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        return tensor.pin_memory() if self._cuda() else tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned() if self._cuda() else False

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self._name

    # ---- capabilities ----------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_bf16_supported() if self._cuda() else True

    def is_fp16_supported(self) -> bool:
        return True

    def amp(self):
        return torch.amp

    # profiler ranges (NVTX on CUDA): markers only, nothing zerofx relies on
    def range_push(self, msg: str) -> None:
        if self._cuda():
            torch.cuda.nvtx.range_push(msg)

    def range_pop(self) -> None:
        if self._cuda():
            torch.cuda.nvtx.range_pop()


_ACCELERATOR: list[Accelerator] = []


def get_accelerator() -> Accelerator:
    """The process's accelerator: CUDA when torch sees a GPU, the CPU otherwise (DeepSpeed
    picks the same way when DS_ACCELERATOR is unset)."""
    if not _ACCELERATOR:
        _ACCELERATOR.append(Accelerator("cuda" if torch.cuda.is_available() else "cpu"))
    return _ACCELERATOR[0]
