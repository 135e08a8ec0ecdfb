"""The shm collective form's files and waits (zerofx/runtime/comm/shm.py): a mirror's file in
/dev/shm never outlives the run that made it, whichever rank fails and when (a leaked one
holds 2 bytes per parameter until reboot); files an older run left are swept; and a rank
waiting on a peer that is alive but never writes gives up after the process group's timeout
with the peer named, without burning a core meanwhile.

Each test points the form at a folder of its own in /dev/shm (same tmpfs, same code path), so
the listing it compares is not disturbed by other runs sharing the host."""
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest
import torch

from multiproc import run_ranks


@pytest.fixture
def shm_dir():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    path = tempfile.mkdtemp(prefix="zerofx-test-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _fails_while_mapping_body(rank, world, shm_dir, bad_rank):
    from zerofx.runtime.comm import shm as shm_comm
    from zerofx.runtime.comm.dist import init_distributed

    init_distributed()
    shm_comm.SHM_DIR = shm_dir
    if rank == bad_rank:
        def boom(*args, **kwargs):
            raise RuntimeError(f"simulated failure of rank {rank} after the file was created")
        torch.from_file = boom  # this rank process only
    shm_comm.ShmMirror(None, 1 << 12, torch.bfloat16, 2)
    return "made"


@pytest.mark.slow
@pytest.mark.parametrize("bad_rank", [0, 1])  # the rank that created the file, and a peer
def test_a_rank_failing_right_after_the_mirror_is_created_leaves_no_file(shm_dir, bad_rank):
    before = sorted(os.listdir(shm_dir))
    with pytest.raises(AssertionError, match="simulated failure"):
        run_ranks(_fails_while_mapping_body, 2, args=(shm_dir, bad_rank), timeout_s=60)
    # every rank has exited (the harness killed the one still waiting): nothing may remain
    assert sorted(os.listdir(shm_dir)) == before == []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _mirror_body(rank, world, shm_dir):
    from zerofx.runtime.comm import shm as shm_comm
    from zerofx.runtime.comm.dist import init_distributed

    init_distributed()
    shm_comm.SHM_DIR = shm_dir
    shm_comm.ShmMirror(None, 64, torch.float32, 1)
    return sorted(os.listdir(shm_dir))


@pytest.mark.slow
def test_files_an_earlier_run_left_are_swept_when_their_process_is_gone(shm_dir):
    old = time.time() - 2 * 3600  # older than any collective timeout
    names = {what: f"zerofx-{pid}-{uuid.uuid4().hex}" for what, pid in
             (("dead_old", _dead_pid()), ("live_old", os.getpid()), ("dead_new", _dead_pid()))}
    for what, name in names.items():
        with open(os.path.join(shm_dir, name), "wb") as f:
            f.write(b"\0" * 64)
        if what.endswith("old"):
            os.utime(os.path.join(shm_dir, name), (old, old))
    [left] = run_ranks(_mirror_body, 1, args=(shm_dir,), timeout_s=60)
    # a live owner's file, or a fresh one (its run may still be setting up), is kept
    assert left == sorted([names["live_old"], names["dead_new"]]), left


def _silent_peer_body(rank, world, marker):
    from zerofx.runtime.comm import shm as shm_comm
    from zerofx.runtime.comm.dist import init_distributed

    init_distributed(timeout_s=3.0)  # the group's timeout, which the shm form must keep
    mirror = shm_comm.ShmMirror(None, 64, torch.float32, 1)
    if rank == 1:  # alive, but never writes: a rank stuck elsewhere
        deadline = time.monotonic() + 60
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    shm_comm.start_gather(mirror, 0, [(0, torch.zeros(64))])
    # thread_time: this thread's polls only, not gloo's or torch's own threads (whose
    # wake-ups on a loaded host cost a few percent and made process_time flaky)
    t0, cpu0 = time.monotonic(), time.thread_time()
    try:
        mirror.wait_written(0)
        result = "waited to the end"
    except shm_comm.ShmError as e:
        result = str(e)
    waited, cpu = time.monotonic() - t0, time.thread_time() - cpu0
    open(marker, "w").close()
    return result, waited, cpu


@pytest.mark.slow
def test_a_rank_waiting_on_a_live_silent_peer_gives_up_after_the_group_timeout(tmp_path):
    message, waited, cpu = run_ranks(_silent_peer_body, 2, args=(str(tmp_path / "done"),),
                                     timeout_s=60)[0]
    assert "rank 1" in message and "3 s" in message and "timeout" in message, message
    assert "init_process_group(timeout=" in message, message  # the fix
    assert 2.5 < waited < 10, waited
    # polls back off: a spinning wait burns ~100% of a core; a backed-off one a few percent
    assert cpu < 0.2 * waited, (cpu, waited)


def test_a_peer_maps_only_the_creators_file_never_what_its_descriptor_names_later(tmp_path):
    """The creator's /proc/<pid>/fd/<n> can name another of its files once it closed the
    mirror's (a failing rank opens its sources for the traceback): a peer that opened that
    path gets no descriptor, and the other file is left as it was (mapping it at the
    mirror's size had overwritten a test module in a CI run)."""
    from zerofx.runtime.comm.shm import _open_same

    mirror, other = tmp_path / "mirror", tmp_path / "source.py"
    mirror.write_bytes(b"\0" * 64)
    other.write_text("x = 1\n")
    st = os.stat(mirror)
    fd = _open_same(str(other), (st.st_dev, st.st_ino))
    assert fd is None and other.read_text() == "x = 1\n"
    fd = _open_same(str(mirror), (st.st_dev, st.st_ino))
    assert fd is not None and os.fstat(fd).st_ino == st.st_ino
    os.close(fd)
