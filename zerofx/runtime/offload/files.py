"""The file offloaded state lives in (optimizer state, stage 3's parameters): private,
preallocated, gone with its process.

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
    """The offloaded optimizer state (or stage 3's parameters) cannot be created, read or
    written."""


# What a file holds: (its name in messages, the config block whose nvme_path it is under,
# the file's suffix)
OPTIMIZER = ("optimizer state", "offload_optimizer", "state")
PARAMS = ("parameters", "offload_param", "params")


def path_error(path: str, e: OSError, doing: str, *, nbytes: int | None = None,
               role=OPTIMIZER) -> OffloadError:
    """One message naming the path, the OS's cause, the config key and the fix."""
    what, block, _ = role
    key = f"zero_optimization.{block}.nvme_path"
    cause = os.strerror(e.errno) if e.errno else str(e)
    if e.errno == errno.ENOSPC:
        need = f" (the {what} need {nbytes / 2**30:.2f} GiB per rank)" if nbytes else ""
        fix = f"free space there or point {key} at a larger disk{need}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make it writable for this user or choose another {key}"
    elif e.errno in (errno.ENOENT, errno.ENOTDIR):
        fix = f"create the directory or fix {key}"
    elif e.errno in (errno.ELOOP, errno.EEXIST):
        fix = "something (a symlink?) is in the way: zerofx never follows or reuses one"
    else:
        fix = "check the disk"
    return OffloadError(f"offloaded {what}: {doing} {path} failed: {cause}; {fix}")


class StateFile:
    """One open, unlinked, preallocated file of ``nbytes`` bytes (see the module doc)."""

    def __init__(self, fd: int, path: str, nbytes: int, block_size: int, role=OPTIMIZER):
        self.fd, self.path, self.nbytes, self.block_size = fd, path, nbytes, block_size
        self.role = role

    @classmethod
    def create(cls, root, nbytes: int, *, rank: int, block_size: int,
               role=OPTIMIZER) -> "StateFile":
        """``role``: OPTIMIZER (``rank<r>.state``) or PARAMS (``rank<r>.params``)."""
        root = os.path.abspath(os.fspath(root))
        run_dir = os.path.join(root, f"zerofx-offload-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            os.mkdir(run_dir, 0o700)  # exclusive: fails if anything is there, symlinks too
        except OSError as e:
            raise path_error(run_dir, e, "creating the directory", role=role) from None
        path = os.path.join(run_dir, f"rank{rank}.{role[2]}")
        try:
            fd = open_private(run_dir, os.path.basename(path), role=role)
        except OffloadError:
            os.rmdir(run_dir)
            raise
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)  # reads as zeros: the moments' start
        except OSError as e:
            os.close(fd)
            _remove(path, run_dir)
            raise path_error(path, e, f"reserving {nbytes} bytes for", nbytes=nbytes,
                             role=role) from None
        _remove(path, run_dir)  # the descriptor keeps the data; nobody can open it by name
        log.info("%s of rank %d offloaded to %s (%.2f GiB, unlinked: freed when this "
                 "process ends)", role[0], rank, path, nbytes / 2**30)
        return cls(fd, path, nbytes, block_size, role)

    def read_into(self, buffer: torch.Tensor, offset: int) -> None:
        """Fill ``buffer`` (contiguous, CPU) from byte ``offset`` of the file."""
        view = _bytes(buffer)
        for pos in range(0, len(view), self.block_size):
            part = view[pos:pos + self.block_size]
            while len(part):
                try:
                    got = os.preadv(self.fd, [part], offset + pos)
                except OSError as e:
                    raise path_error(self.path, e, "reading", role=self.role) from None
                if got == 0:
                    raise OffloadError(f"offloaded {self.role[0]}: {self.path} ended at byte "
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
                    raise path_error(self.path, e, "writing", nbytes=self.nbytes,
                                     role=self.role) from None
                part, pos = part[put:], pos + put

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_private(directory: str, name: str, *, role=OPTIMIZER) -> int:
    """``directory/name`` created exclusively, mode 0600, never through a symlink."""
    path = os.path.join(directory, name)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise path_error(directory, e, "opening the directory", role=role) from None
    try:
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600, dir_fd=dir_fd)
    except OSError as e:
        raise path_error(path, e, "creating", role=role) from None
    finally:
        os.close(dir_fd)


def _remove(path: str, run_dir: str) -> None:
    os.unlink(path)
    os.rmdir(run_dir)


def _bytes(t: torch.Tensor) -> memoryview:
    assert t.is_contiguous() and t.device.type == "cpu"
    # as bytes: numpy has no bfloat16
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
