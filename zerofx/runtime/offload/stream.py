"""Streaming an offloaded state through memory, chunk by chunk, I/O overlapped with compute.

The file holds the shard's three fp32 fields (master weights, exp_avg, exp_avg_sq) chunk by
chunk: chunk [a, b) of the shard is the bytes [12a, 12b), its ``master``, ``exp_avg`` and
``exp_avg_sq`` one after the other, so reading or writing any run of its fields is one
contiguous transfer. ``run`` visits the chunks in order, each in one of ``buffer_count``
buffers::

    time ─▶   read c+1            (reader threads)
              update c            (the caller, on this thread)
              write c-1           (writer threads)

Reading chunk c+1 needs a buffer whose earlier chunk's write has finished: with 3 or more
buffers the three overlap; with 2 the read of c+1 waits for the write of c-1; with 1 nothing
overlaps. pread/pwrite release the GIL, and so do the fused kernels.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait

import torch

from zerofx.runtime.offload.files import StateFile

FIELDS = ("master", "exp_avg", "exp_avg_sq")
_F32 = 4  # bytes per element of each field


class ChunkStream:
    """Chunks [a, b) of a shard in ``file``, visited through ``buffer_count`` buffers."""

    def __init__(self, file: StateFile, chunks: list[tuple[int, int]], *, buffer_count: int,
                 threads: int):
        self.file, self.chunks = file, chunks
        cap = max((b - a for a, b in chunks), default=0)
        self.buffers = [torch.empty(3 * cap, dtype=torch.float32) for _ in range(buffer_count)]
        self.threads = threads
        self._reader = ThreadPoolExecutor(threads, thread_name_prefix="zerofx-offload-read")
        self._writer = ThreadPoolExecutor(threads, thread_name_prefix="zerofx-offload-write")
        self.chunks_read = 0  # counters, for tests and the benchmark
        self.bytes_read = 0
        self.bytes_written = 0

    def buffer_bytes(self) -> int:
        return sum(b.numel() * _F32 for b in self.buffers)

    def run(self, visit, *, read: tuple[int, int], write: tuple[int, int]) -> None:
        """``visit(i, a, b, fields)`` for every chunk i = [a, b) in order, ``fields`` the
        three [b - a] views of its buffer. Fields ``read`` (a [lo, hi) range of FIELDS) are
        read before the visit, fields ``write`` written after it; an empty range skips.
        Any failure waits for every transfer in flight before it is raised."""
        n, slots = len(self.chunks), len(self.buffers)
        ahead = slots - 2 if slots >= 3 else slots - 1  # chunks read beyond the current
        reads: dict[int, list] = {}
        writes: list[list] = [[] for _ in range(slots)]
        started = 0
        try:
            for i in range(n):
                while started < n and started <= i + ahead:
                    _finish(writes[started % slots])  # that buffer's last write is done
                    reads[started] = self._transfer(self._reader, started, read, load=True)
                    started += 1
                _finish(reads[i])
                del reads[i]
                a, b = self.chunks[i]
                visit(i, a, b, self._fields(i % slots, b - a))
                writes[i % slots] = self._transfer(self._writer, i, write, load=False)
            for w in writes:
                _finish(w)
        except BaseException:
            wait([f for fs in (*reads.values(), *writes) for f in fs])
            raise

    def _fields(self, slot: int, n: int) -> list[torch.Tensor]:
        return list(self.buffers[slot][:3 * n].view(3, n).unbind(0))

    def _transfer(self, pool, i: int, fields: tuple[int, int], *, load: bool) -> list:
        """Chunk i's fields [lo, hi) between the file and its buffer, split among the
        threads; the futures."""
        lo, hi = fields
        if hi <= lo:
            return []
        a, b = self.chunks[i]
        n = b - a
        region = self.buffers[i % len(self.buffers)][lo * n:hi * n]
        offset = _F32 * (3 * a + lo * n)
        step = -(-region.numel() // self.threads)
        futures = []
        for s in range(0, region.numel(), step):
            part = region[s:s + step]
            op = self.file.read_into if load else self.file.write_from
            futures.append(pool.submit(op, part, offset + _F32 * s))
        if load:
            self.chunks_read += 1
            self.bytes_read += region.numel() * _F32
        else:
            self.bytes_written += region.numel() * _F32
        return futures

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self.buffers = []


def _finish(futures: list) -> None:
    for f in futures:
        f.result()  # raises the transfer's error
    futures.clear()
