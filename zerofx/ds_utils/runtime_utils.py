"""``deepspeed.runtime.utils`` as scripts import it: ``see_memory_usage`` and
``move_to_device``; every other name there is DeepSpeed's engine internals (overflow checks,
flattened norms, partitioned tensors), which zerofx's graphs do instead, so importing one is
an ImportError that says so.
"""
from __future__ import annotations

import torch

from zerofx.ds_utils.memory import see_memory_usage

__all__ = ["move_to_device", "see_memory_usage"]


def move_to_device(item, device, criterion_func=lambda t: torch.is_tensor(t)):
    """DeepSpeed's: ``item`` (a tensor, or lists, tuples and dicts of them) with every value
    that ``criterion_func`` accepts moved to ``device``; other values as they are."""
    if criterion_func(item):
        return item.to(device)
    if isinstance(item, list):
        return [move_to_device(v, device, criterion_func) for v in item]
    if isinstance(item, tuple):
        return tuple(move_to_device(v, device, criterion_func) for v in item)
    if isinstance(item, dict):
        return {k: move_to_device(v, device, criterion_func) for k, v in item.items()}
    return item


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"deepspeed.runtime.utils.{name} is DeepSpeed's engine internals, "
                      f"which zerofx's compiled graphs do instead; zerofx serves "
                      f"{', '.join(__all__)} from this module", name=name)
