"""The file an offloaded optimizer state lives in: private, preallocated, gone with its process.

    f = StateFile.create(nvme_path, nbytes, rank=0, block_size=1 << 20)
    f.read_into(buffer, offset)       # fills the whole tensor ``buffer`` from byte ``offset``
    f.write_from(buffer, offset)
    f.close()                         # frees the disk space

The file is made in a fresh per-process directory ``<nvme_path>/zerofx-offload-<pid>-<token>``
(mode 0700, ``mkdir`` fails on anything already there, a symlink included), opened with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 relative to that directory, preallocated
with ``posix_fallocate`` (a disk without room fails here, at startup, naming the path, not
in the middle of a step) and then unlinked together with its directory: the open descriptor
keeps the data, nobody else can open it by name, and the space is returned when the process
ends, however it ends (a SIGKILL or the OOM killer included). ``close`` (engine.destroy,
atexit) returns it earlier.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets

import torch

log = logging.getLogger(__name__)


class OffloadError(RuntimeError):
    """The offloaded optimizer state cannot be created, read or written."""


def path_error(path: str, e: OSError, doing: str, *, nbytes: int | None = None) -> OffloadError:
    """One message naming the path, the OS's cause and the fix."""
    cause = os.strerror(e.errno) if e.errno else str(e)
    if e.errno == errno.ENOSPC:
        need = f" (the state needs {nbytes / 2**30:.2f} GiB per rank)" if nbytes else ""
        fix = f"free space there or point offload_optimizer.nvme_path at a larger disk{need}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable for this user or choose another offload_optimizer.nvme_path"
    elif e.errno in (errno.ENOENT, errno.ENOTDIR):
        fix = "create the directory or fix offload_optimizer.nvme_path"
    elif e.errno in (errno.ELOOP, errno.EEXIST):
        fix = "something (a symlink?) is in the way: zerofx never follows or reuses one"
    else:
        fix = "check the disk"
    return OffloadError(f"offloaded optimizer state: {doing} {path} failed: {cause}; {fix}")


class StateFile:
    """One open, unlinked, preallocated file of ``nbytes`` bytes (see the module doc)."""

    def __init__(self, fd: int, path: str, nbytes: int, block_size: int):
        self.fd, self.path, self.nbytes, self.block_size = fd, path, nbytes, block_size

    @classmethod
    def create(cls, root, nbytes: int, *, rank: int, block_size: int) -> "StateFile":
        root = os.path.abspath(os.fspath(root))
        run_dir = os.path.join(root, f"zerofx-offload-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            os.mkdir(run_dir, 0o700)  # exclusive: fails if anything is there, symlinks too
        except OSError as e:
            raise path_error(run_dir, e, "creating the directory") from None
        path = os.path.join(run_dir, f"rank{rank}.state")
        try:
            fd = open_private(run_dir, os.path.basename(path))
        except OffloadError:
            os.rmdir(run_dir)
            raise
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)  # reads as zeros: the moments' start
        except OSError as e:
            os.close(fd)
            _remove(path, run_dir)
            raise path_error(path, e, f"reserving {nbytes} bytes for", nbytes=nbytes) \
                from None
        _remove(path, run_dir)  # the descriptor keeps the data; nobody can open it by name
        log.info("optimizer state of rank %d offloaded to %s (%.2f GiB, unlinked: freed when "
                 "this process ends)", rank, path, nbytes / 2**30)
        return cls(fd, path, nbytes, block_size)

    def read_into(self, buffer: torch.Tensor, offset: int) -> None:
        """Fill ``buffer`` (contiguous, CPU) from byte ``offset`` of the file."""
        view = _bytes(buffer)
        for pos in range(0, len(view), self.block_size):
            part = view[pos:pos + self.block_size]
            while len(part):
                try:
                    got = os.preadv(self.fd, [part], offset + pos)
                except OSError as e:
                    raise path_error(self.path, e, "reading") from None
                if got == 0:
                    raise OffloadError(f"offloaded optimizer state: {self.path} ended at byte "
                                       f"{offset + pos} (expected {self.nbytes} bytes): the "
                                       f"file was truncated by someone else")
                part, pos = part[got:], pos + got

    def write_from(self, buffer: torch.Tensor, offset: int) -> None:
        """Write ``buffer`` (contiguous, CPU) at byte ``offset`` of the file."""
        view = _bytes(buffer)
        for pos in range(0, len(view), self.block_size):
            part = view[pos:pos + self.block_size]
            while len(part):
                try:
                    put = os.pwrite(self.fd, part, offset + pos)
                except OSError as e:
                    raise path_error(self.path, e, "writing", nbytes=self.nbytes) from None
                part, pos = part[put:], pos + put

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_private(directory: str, name: str) -> int:
    """``directory/name`` created exclusively, mode 0600, never through a symlink."""
    path = os.path.join(directory, name)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise path_error(directory, e, "opening the directory") from None
    try:
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600, dir_fd=dir_fd)
    except OSError as e:
        raise path_error(path, e, "creating") from None
    finally:
        os.close(dir_fd)


def _remove(path: str, run_dir: str) -> None:
    os.unlink(path)
    os.rmdir(run_dir)


def _bytes(t: torch.Tensor) -> memoryview:
    assert t.is_contiguous() and t.device.type == "cpu"
    return memoryview(t.numpy()).cast("B")
