"""What every rank must start from: rank 0's weights and buffers, rank 0's compile choices,
and within a tensor-parallel group one random stream.

torch seeds each process differently, and DeepSpeed's tutorials seed nothing: without this,
ranks initialise different weights and (stage 0) train different models for good, or
(stages 1-3) a mix of every rank's. DeepSpeed and DDP broadcast rank 0's parameters and
buffers at start; so does zerofx, on every path (runtime/zero.py, runtime/plain_dp.py).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from zerofx.cpu_gemm import host_forms
from zerofx.runtime.comm.dist import from_first_rank

log = logging.getLogger(__name__)

# One broadcast per this many bytes: few calls (gloo pays ~0.3 ms each), bounded temporaries.
CHUNK_BYTES = 64 << 20
# A tensor this large is its own broadcast, with no copy: a call's ~0.3 ms is small beside
# moving 4 MiB, and a model built in files (zero.Init) is not copied into temporaries.
OWN_BYTES = 4 << 20


def broadcast_tensors(tensors, *, group=None) -> int:
    """Overwrite ``tensors`` with the group's first rank's values, in place, coalesced by
    dtype and device; returns how many were sent. A collective: every rank of ``group``
    passes tensors of the same shapes and dtypes in the same order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    src = dist.get_process_group_ranks(group)[0] if group is not None else 0
    todo = [t for t in tensors if t.numel() > 0]
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in todo:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for chunk in _chunks(by_kind):
            if len(chunk) == 1 and chunk[0].is_contiguous():
                _broadcast_in_place(chunk[0], src, group)
                continue
            flat = torch.cat([t.detach().reshape(-1) for t in chunk])
            if flat.dtype == torch.bool:  # masks kept as buffers: gloo moves bytes, not bools
                flat = flat.to(torch.uint8)
            dist.broadcast(flat, src=src, group=group)
            at = 0
            for t in chunk:
                t.detach().copy_(flat[at:at + t.numel()].view(t.shape))
                at += t.numel()
            del flat  # before the next chunk's cat: one chunk of temporaries at a time
    return len(todo)


def _broadcast_in_place(t: torch.Tensor, src: int, group) -> None:
    """A tensor that is a chunk of its own (a large weight) is sent from its own memory,
    CHUNK_BYTES at a time: no copy of it is made (a model built in files under zero.Init
    stays page cache, not a whole-weight temporary)."""
    flat = t.detach().view(-1)
    if flat.dtype == torch.bool:  # gloo moves bytes, not bools
        flat = flat.view(torch.uint8)
    per = max(1, CHUNK_BYTES // flat.element_size())
    for at in range(0, flat.numel(), per):
        dist.broadcast(flat[at:at + per], src=src, group=group)


def _chunks(by_kind):
    """Lists of tensors to send in one call: small ones coalesced up to CHUNK_BYTES, each
    of at least OWN_BYTES alone (sent from its own memory, _broadcast_in_place)."""
    for same in by_kind.values():
        chunk, size = [], 0
        for t in same:
            if t.numel() * t.element_size() >= OWN_BYTES and t.is_contiguous():
                yield [t]
                continue
            if chunk and size + t.numel() * t.element_size() > CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
            chunk.append(t)
            size += t.numel() * t.element_size()
        if chunk:
            yield chunk


def broadcast_model(model: nn.Module, *, split: frozenset = frozenset(), dp_group=None) -> int:
    """Rank 0's parameters and buffers into ``model`` on every rank (DDP's start).

    ``split`` names parameters that are already tensor-parallel pieces (a Megatron mpu's):
    those differ across a tensor-parallel group by design and come from the first rank of
    this rank's data-parallel ``dp_group``; everything else (whole weights zerofx will cut
    into pieces itself, norms, buffers) comes from global rank 0."""
    seen: set[int] = set()
    whole, pieces = [], []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:  # tied weights: one tensor, sent once
            continue
        seen.add(id(t))
        (pieces if name in split else whole).append(t)
    sent = broadcast_tensors(whole)
    if pieces:
        sent += broadcast_tensors(pieces, group=dp_group)
    return sent


def agree_random_stream(tp_group) -> None:
    """Every rank of ``tp_group`` takes its first rank's torch RNG state (CPU, and the
    current CUDA device's when CUDA is initialised).

    Tensor-parallel ranks hold one replicated activation between a row-parallel and the next
    column-parallel layer; dropout on it must draw one mask on every rank, or the ranks'
    replicated values (and then their norms' weights) part silently. The ranks run the same
    program on equal local shapes, so one starting state keeps their streams in step. In
    split regions (attention probabilities of each rank's heads) the ranks then draw the same
    pattern for different heads: still dropout at its rate, though not the independent masks
    of Megatron's per-rank RNG tracker (docs/tensor-parallel.md)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cpu_state, cuda_state = from_first_rank(
        lambda: (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None),
        tp_group)
    torch.set_rng_state(cpu_state)
    if cuda and cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state)


def agreed_matmul_forms(pinned: str) -> tuple[tuple[str, str], ...]:
    """Rank 0's CPU matmul forms (zerofx/cpu_gemm.py), the same on every rank: ranks on
    hosts with other instruction sets would otherwise compile different programs. A
    collective when a process group exists."""
    forms = host_forms(pinned)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        agreed = from_first_rank(lambda: forms)
        if agreed != forms:
            log.warning("CPU matmul forms: this host would take %s; every rank takes rank "
                        "0's %s so that all compute the same program", forms, agreed)
        forms = agreed
    return forms
