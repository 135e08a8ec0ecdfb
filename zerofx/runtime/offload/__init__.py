"""Optimizer offload: the fp32 master shard and the moments on disk (ZeRO-Infinity's NVMe
offload) or, with parameters on a GPU, in host memory (ZeRO-Offload, ``host``).

    files    StateFile: the private, preallocated, unlinked file; OffloadError
    stream   ChunkStream: chunks through a few buffers, reads and writes overlapped
    state    OffloadedState: the step's passes over the chunks, whole-state reads and writes
    ops      the step graph's ops and the ``update`` the step function uses
    host     HostOffload: the state in (pinned) host memory, gradients and updates copied
    scratch  scratch_tensors: file-backed whole copies (checkpoints, state_dict), need not fit
    params   ParamStore: stage 3's 16-bit parameter shard on NVMe (offload_param), read per
             bucket for the gathers (runtime/param_gather.py), written by chunk by the step

The runtime meets it at two seams: TrainState (its ``offload`` and ``optimizer_state``) and
the step function's ``update`` (runtime/step_fn.py). docs/offload.md is the user's page.
"""
from __future__ import annotations

from zerofx.runtime.offload.files import OffloadError
from zerofx.runtime.offload.state import OffloadedState, check_offloadable

__all__ = ["OffloadError", "OffloadedState", "default_chunk", "open_offload"]


def default_chunk(shard_numel: int) -> int:
    """Elements per chunk without sub_group_size: a sixteenth of the shard, so the buffers
    (buffer_count of them) hold a fraction of the state, within [2**20, 2**24] elements
    (12 MiB to 192 MiB per buffer: large sequential transfers, bounded memory)."""
    return min(max(shard_numel // 16, 1 << 20), 1 << 24)


def open_offload(config, plan, spec, device):
    """The offloaded state the config asks for: an OffloadedState (nvme), a HostOffload
    (cpu) or None (the state stays in memory)."""
    from zerofx.config.blocks import AioConfig

    off = config.zero_optimization.offload_optimizer
    if off.device == "cpu":
        from zerofx.runtime.offload.host import open_host_offload
        return open_host_offload(config, plan, spec, device)
    if off.device != "nvme":
        return None
    check_offloadable(device, spec.kind)
    aio = config.aio or AioConfig()
    return OffloadedState(plan, kind=spec.kind, hyper=spec.hyper, path=off.nvme_path,
                          chunk=config.zero_optimization.sub_group_size
                          or default_chunk(plan.shard_numel),
                          buffer_count=off.buffer_count, block_size=aio.block_size,
                          threads=aio.intra_op_parallelism)
