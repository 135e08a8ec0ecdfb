"""Distributed bootstrap from the torchrun environment, and the multi-rank test harness."""
import time

import pytest
import torch.distributed as dist

from multiproc import run_ranks
from zerofx.runtime.comm.dist import DistributedSetupError, init_distributed


def test_no_env_is_single_process(no_torchrun_env):
    info = init_distributed()
    assert (info.rank, info.world_size) == (0, 1) and not dist.is_initialized()


def test_incomplete_env_names_missing_vars(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR, MASTER_PORT missing"):
        init_distributed()


def test_bad_rank_is_named(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "x")
    for k, v in dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistributedSetupError, match="RANK='x' is not an integer"):
        init_distributed()


def _bootstrap_body(rank, world_size):
    import torch

    info = init_distributed()
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)  # really connected: sum of ranks
    return info.rank, info.world_size, dist.get_backend(), t.item()


@pytest.mark.parametrize("world", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_join_gloo_group(world):
    results = run_ranks(_bootstrap_body, world)
    total = sum(range(world))
    assert results == [(r, world, "gloo", float(total)) for r in range(world)]


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def _hang(rank, world_size):
    time.sleep(60)


def test_harness_shows_failing_rank_traceback():
    with pytest.raises(AssertionError, match=r"(?s)rank 1 of 2 failed.*ValueError: boom on purpose"):
        run_ranks(_fail_on_rank_one, 2)


def test_harness_time_bound():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish within 3 s"):
        run_ranks(_hang, 2, timeout_s=3)
    assert time.monotonic() - t0 < 30


def _abort_on_rank_one(rank, world_size):
    import os

    if rank == 1:
        os.abort()
    return rank


def test_harness_fails_at_once_when_a_rank_dies_by_a_signal():
    """No rerun: a rank killed by a signal fails the test with that rank's own stderr
    (faulthandler's stack of where it died)."""
    with pytest.raises(AssertionError, match="exit code -6") as e:
        run_ranks(_abort_on_rank_one, 2)
    assert "rank 1 stderr" in str(e.value) and "_abort_on_rank_one" in str(e.value)


def _abort_after_a_cause(rank, world_size):
    import os
    import sys
    import threading

    if rank == 1:
        # many idle threads: faulthandler prints each one's stack after the fatal line,
        # more than the tail the report shows
        for _ in range(40):
            threading.Thread(target=threading.Event().wait, daemon=True).start()
        sys.stderr.write("terminate called after throwing an instance of 'gloo::IoException'"
                         "\n")
        sys.stderr.flush()
        os.abort()
    return rank


def test_harness_shows_what_preceded_a_fatal_error():
    """The cause printed before faulthandler's "Fatal Python error" is in the report even
    when the threads' stacks after it fill the stderr tail."""
    with pytest.raises(AssertionError, match="exit code -6") as e:
        run_ranks(_abort_after_a_cause, 2)
    assert "before its fatal error" in str(e.value)
    assert "gloo::IoException" in str(e.value)


def test_deepspeed_init_distributed_signature(no_torchrun_env, monkeypatch):
    """zerofx.init_distributed takes deepspeed.init_distributed's arguments: single process
    without an environment; an init_method and a rank the environment contradicts are
    refused by name."""
    import zerofx

    info = zerofx.init_distributed(dist_backend="gloo", auto_mpi_discovery=True,
                                   distributed_port=29500, verbose=False)
    assert (info.rank, info.world_size) == (0, 1) and not dist.is_initialized()
    with pytest.raises(DistributedSetupError, match="init_method"):
        zerofx.init_distributed(init_method="tcp://127.0.0.1:1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DistributedSetupError, match="rank=0.*RANK=1"):
        zerofx.init_distributed(rank=0)


def _deepspeed_init_body(rank, world_size):
    import zerofx

    info = zerofx.init_distributed(dist_backend="gloo")
    return info.rank, info.world_size, dist.is_initialized()


def test_deepspeed_init_distributed_joins_the_group():
    assert run_ranks(_deepspeed_init_body, 2) == [(0, 2, True), (1, 2, True)]


def test_a_port_in_use_says_which_and_how_to_choose_another(monkeypatch):
    import socket

    with socket.socket() as busy:  # the rendezvous port, taken by another process
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(DistributedSetupError, match=f"127.0.0.1:{port}.*--master_port"):
            init_distributed(timeout_s=5)
