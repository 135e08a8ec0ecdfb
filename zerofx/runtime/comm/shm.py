"""The ``shm`` collective form: ranks on one host move bytes through shared memory.

gloo sends through loopback TCP: each byte is copied into a socket and out of it by the
kernel, on the cores that also compute (16M bf16 elements, 2 ranks: ~26 ms point-to-point
on this 2-core host). Ranks on one host can instead map one file in /dev/shm: a rank
writes what it sends there (one copy), raises a flag, and a reader copies out what it needs
once the flags are up (one more). gloo is used only to agree on the file's name.

    reduce (2 ranks)  rank r writes the peer's row of the bucket, then adds the peer's
                      write to its own row: one addition per element, a + b = b + a, so
                      the bits of gloo's all-reduce (the same rule as the p2p form)
    gather            each rank writes its own rows, then copies every row out: copies only

Flags, per rank and key (a bucket or a step chunk), are sequence numbers in the same file:
``ready`` = the last round a rank wrote under the key, ``done`` = the last round it read.
A writer waits until every peer has read its previous round before it overwrites it, a
reader until every peer has written this round. x86-64 keeps stores in program order and
loads in program order, so a flag seen up means its data is there: the form is offered on
x86-64 only, with gloo, when every rank of the group is on this host (same boot id).

The file has a name in /dev/shm only between two system calls: its creator unlinks it at
once and the others open it through ``/proc/<creator pid>/fd/<fd>`` (same host, same pid
namespace, same user: checked by ``available``). Its pages then live as long as a mapping or
that descriptor holds them, so no rank's death can leave 2 bytes per parameter in /dev/shm
until reboot. Files an older run did leave are swept when their owner (the pid in the
name) is gone.
"""
from __future__ import annotations

import os
import platform
import re
import socket
import time
import uuid

import torch
import torch.distributed as dist

from zerofx.runtime.comm.dist import from_first_rank
from zerofx.runtime.comm.pending import Pending

CHECK_S = 0.5  # how often a waiting rank checks that the ranks it waits for still run
# between looks at the flags once a wait is not brief: from SLEEP_S, growing by a quarter
# per look (a wait ends at most a quarter late) up to MAX_SLEEP_S (a waiting rank costs
# well under 1% of a core, not the 7% a fixed 0.2 ms sleep did)
SLEEP_S, MAX_SLEEP_S = 2e-4, 1e-2
STALE_S = 3600.0  # a file older than gloo's default timeout is no run's setup in progress
SHM_DIR = "/dev/shm"
_ALIGN = 64
_NAME = re.compile(r"zerofx-(\d+)-[0-9a-f]{32}")


def available(group, nbytes: int, device: torch.device) -> bool:
    """Whether the shm form may be offered on ``group`` for buffers of ``nbytes`` in all (a
    collective on the group): CPU tensors over gloo on x86-64, every rank on this host, and
    room for them in /dev/shm (a container's default is 64 MiB)."""
    if dist.get_backend(group) != "gloo":  # the same on every rank: no collective needed
        return False  # (nccl's all_gather_object would need each rank's device set)
    if platform.machine().lower() not in ("x86_64", "amd64") or device.type != "cpu" or \
            _free_bytes() < 2 * nbytes:
        here = None
    else:  # one kernel, one /dev/shm (mount namespace), pids that mean the same process, and
        # one user (the file is private to it, and opened through its creator's /proc/pid/fd)
        here = (socket.gethostname(), _boot_id(), _namespace("mnt"), _namespace("pid"),
                os.getuid())
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, here, group=group)
    return everyone[0] is not None and all(h == everyone[0] for h in everyone)


def _free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _namespace(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (of this pid namespace) runs: not gone, not a zombie."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except ProcessLookupError:
        return False
    except OSError:  # no /proc or no permission to signal it: assume alive
        return True


class ShmError(RuntimeError):
    """The shm form cannot go on: no room in /dev/shm, or a peer stopped while this rank
    waited for it."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class ShmMirror:
    """``numel`` elements of ``dtype`` every rank of ``group`` maps, with ready/done flags
    for ``keys`` independent rounds (a collective to create)."""

    def __init__(self, group, numel: int, dtype: torch.dtype, keys: int):
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.timeout_s = _timeout_s(group)
        flag_bytes = -(-2 * self.world * keys * 8 // _ALIGN) * _ALIGN
        size = flag_bytes + numel * dtype.itemsize
        held = []  # the creator's descriptor: the file's only hold until every rank maps it

        def create():
            fd, why = _create(size)
            if fd is None:
                return None, why
            held.append(fd)
            st = os.fstat(fd)  # the file's identity: a peer checks it opened this file
            return (f"/proc/{os.getpid()}/fd/{fd}", st.st_dev, st.st_ino), None

        try:
            where, why = from_first_rank(create, group)  # or (None, why)
            raw = self._map(group, where, why, size)
            dist.barrier(group=group)  # every rank has it mapped: the descriptor can go
        finally:
            for fd in held:
                os.close(fd)
        flags = raw[:flag_bytes].view(torch.int64)[:2 * self.world * keys]
        self.ready, self.done = flags.view(2, self.world, keys).unbind(0)
        self.data = raw[flag_bytes:].view(dtype)
        self._round = [0] * keys

    def _map(self, group, where, why, size: int) -> torch.Tensor:
        path = where[0] if where is not None else None
        # This rank's own descriptor of the file, checked to be the creator's file: the
        # creator's descriptor number can name another of its files a moment later (it
        # failed and closed it, then opened a source file for its traceback), and mapping
        # that one at ``size`` would overwrite it.
        mine = _open_same(path, where[1:]) if path is not None else None
        try:
            # every rank's pid (to notice a peer that exits while this rank waits for it),
            # and whether it holds the file (from_file would quietly create one of its own)
            seen = [None] * self.world
            dist.all_gather_object(seen, (os.getpid(), mine is not None), group=group)
            if path is not None and not all(ok for _, ok in seen):
                why = (f"rank {next(r for r, (_, ok) in enumerate(seen) if not ok)} cannot "
                       f"open {path}: another user, /proc mounted with hidepid, or the "
                       f"creating rank stopped")
            if path is None or why is not None:
                raise ShmError(
                    f"zerofx shm collective form: cannot share {size / 2**20:.0f} MiB in "
                    f"{SHM_DIR} ({why}); give it more room (docker run --shm-size) or set "
                    f'"zerofx": {{"reduce_form": "p2p", "gather_form": "p2p"}}')
            self.pids = [pid for pid, _ in seen]
            return torch.from_file(f"/proc/self/fd/{mine}", shared=True, size=size,
                                   dtype=torch.uint8)
        finally:
            if mine is not None:
                os.close(mine)

    def write(self, key: int, pieces) -> None:
        """Start a round under ``key``: copy each (offset, tensor) of ``pieces`` in."""
        n = self._round[key] = self._round[key] + 1
        self._await(self.done, key, n - 1, "finish reading the last round")
        for off, t in pieces:
            self.data[off:off + t.numel()].copy_(t.reshape(-1))
        self.ready[self.rank, key] = n

    def wait_written(self, key: int) -> None:
        """Until every rank has written this round under ``key``."""
        self._await(self.ready, key, self._round[key], "write")

    def read_done(self, key: int) -> None:
        self.done[self.rank, key] = self._round[key]

    def _await(self, flags: torch.Tensor, key: int, n: int, what: str) -> None:
        column, spins, deadline, check, pause = flags[:, key], 0, None, 0.0, SLEEP_S
        while True:
            late = [p for p, v in enumerate(column.tolist()) if p != self.rank and v < n]
            if not late:
                return
            spins += 1
            if spins <= 100:
                continue
            # not a brief wait: yield the core instead of spinning on it, and look now and
            # then whether the ranks waited for still run (gloo notices a closed socket)
            now = time.monotonic()
            deadline = deadline or now + self.timeout_s
            if now >= check:
                check = now + CHECK_S
                gone = [p for p in late if not _alive(self.pids[p])]
                if gone:
                    raise self._peer_error(gone[0], key, what, "exited: it stopped (see its "
                                           "own error) or ran other collectives than this one")
            if now > deadline:
                raise self._peer_error(late[0], key, what, self._timeout_cause())
            time.sleep(pause)
            pause = min(pause * 1.25, MAX_SLEEP_S)

    def _peer_error(self, p: int, key: int, what: str, cause: str) -> ShmError:
        return ShmError(f"zerofx shm collective: rank {self.rank} waited for rank {p} (pid "
                        f"{self.pids[p]}) to {what} (key {key}), and that rank {cause}")

    def _timeout_cause(self) -> str:
        return (f"did not within {self.timeout_s:.0f} s, the process group's timeout: it is "
                f"stuck or stopped elsewhere (a debugger, SIGSTOP, a long step of its own; "
                f"py-spy dump --pid shows where) or ran other collectives than this one. If it "
                f"is only slow, give the group a longer timeout: "
                f"torch.distributed.init_process_group(timeout=...) or "
                f"deepspeed.init_distributed(timeout=...) before zerofx starts")


def _open_same(path: str, ident: tuple):
    """A descriptor of ``path`` if it is the file ``ident`` (st_dev, st_ino) names, else None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != tuple(ident):
        os.close(fd)
        return None
    return fd


def _timeout_s(group) -> float:
    """The collective timeout of ``group``, bounded by the default group's: zerofx makes its
    subgroups without one (so they carry torch's 30 minutes), while the user's setting is
    the default group's (init_process_group, zerofx's init_distributed)."""
    try:
        cpu = torch.device("cpu")
        world = dist.group.WORLD._get_backend(cpu).options._timeout
        own = (group or dist.group.WORLD)._get_backend(cpu).options._timeout
        return min(own, world).total_seconds()
    except (AttributeError, RuntimeError):  # private in torch: its default if it moved
        return dist.default_pg_timeout.total_seconds()


def _create(size: int) -> tuple:
    """A new file of ``size`` bytes in /dev/shm with its pages reserved (zeros), already
    unlinked: a full tmpfs fails here, not later as a SIGBUS on first touch. (fd, None) or
    (None, why); the caller closes the fd once every rank has mapped the file."""
    _sweep()
    path = os.path.join(SHM_DIR, f"zerofx-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as e:
        return None, e.strerror
    os.unlink(path)  # at once: from here only descriptors and mappings hold it
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        return None, e.strerror
    return fd, None


def _sweep() -> None:
    """Remove the files earlier runs left in /dev/shm (before files were unlinked at once,
    a rank that died during setup left one): those whose owner, the pid in the name, no
    longer runs, and old enough that no run can still be setting up with them (a pid of
    another pid namespace sharing /dev/shm would look gone)."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if _NAME.fullmatch(n)]
    except OSError:
        return
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            if time.time() - os.stat(path).st_mtime > STALE_S and \
                    not _alive(int(_NAME.fullmatch(name).group(1))):
                os.unlink(path)
        except OSError:  # gone already, or not ours to remove
            continue


def start_reduce(mirror: ShmMirror, key: int, base: int, flat: torch.Tensor,
                 out: torch.Tensor):
    """2 ranks: ``flat`` ([2 x k]) summed over both, this rank's k-element piece into
    ``out`` once the returned Pending is waited on; ``base``: where ``flat`` sits in the
    mirror."""
    rows, me = flat.view(2, -1), mirror.rank
    per = rows.shape[1]
    mirror.write(key, [(base + (1 - me) * per, rows[1 - me])])

    def finish():
        mirror.wait_written(key)
        torch.add(rows[me], mirror.data[base + me * per:base + (me + 1) * per], out=out)
        mirror.read_done(key)
    return Pending([], finish)


def start_gather(mirror: ShmMirror, key: int, regions):
    """Every rank's rows of each (base, region) in ``regions`` ([world x k] views, this
    rank's row filled) into every rank's region; ``base``: where it sits in the mirror."""
    me = mirror.rank
    pieces = []
    for base, region in regions:
        rows = region.view(mirror.world, -1)
        pieces.append((base + me * rows.shape[1], rows[me]))
    mirror.write(key, pieces)

    def finish():
        mirror.wait_written(key)
        for base, region in regions:
            rows = region.view(mirror.world, -1)
            per = rows.shape[1]
            for p in range(mirror.world):
                if p != me:
                    rows[p].copy_(mirror.data[base + p * per:base + (p + 1) * per])
        mirror.read_done(key)
    return Pending([], finish)
