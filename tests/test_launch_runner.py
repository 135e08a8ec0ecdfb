"""Running a launch: multi-node jobs over ssh, stopping on failure and on signals
(tools/launch_runner.py).

The multi-node tests need the loopback sshd that .ci/setup.d/10-sshd.sh sets up (ssh aliases
worker-1 and worker-2 for 127.0.0.1:2222). Without it they skip, except in CI (CI=true),
where a missing sshd is a failure.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from zerofx.tools import launch_runner, proc_tree

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_scripts")
TRAIN = os.path.join(SCRIPTS, "train_step.py")
FAIL = os.path.join(SCRIPTS, "fail_rank.py")
LAUNCH = [sys.executable, "-m", "zerofx.tools.launch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def ssh_workers():
    """Skip (fail in CI) unless ``ssh worker-1`` works without a prompt."""
    try:
        done = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                               "worker-1", "true"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=20)
        ok, why = done.returncode == 0, done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, str(e)
    if not ok:
        reason = (f"'ssh -o BatchMode=yes worker-1 true' fails ({why}); run "
                  ".ci/setup.d/10-sshd.sh as root to start the loopback sshd")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def two_nodes(tmp_path):
    (tmp_path / "hostfile").write_text("worker-1 slots=2\nworker-2 slots=2\n")
    return tmp_path


def launch_two_nodes(cwd, script_args, *, timeout=120):
    return subprocess.run(LAUNCH + ["-H", "hostfile", "--master_addr", "127.0.0.1",
                                    "--master_port", str(free_port()), *script_args],
                          cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_nodes_over_ssh_agree_on_the_world(ssh_workers, two_nodes):
    done = launch_two_nodes(two_nodes, [TRAIN, str(two_nodes)])
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads((two_nodes / f"rank{r}.json").read_text()) for r in range(4)]
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert {r["world_size"] for r in results} == {4}
    assert [r["env"]["LOCAL_RANK"] for r in results] == ["0", "1", "0", "1"]
    assert {r["cwd"] for r in results} == {str(two_nodes)}  # same working directory
    assert all(r["params"] == results[0]["params"] for r in results)
    for rank in range(4):
        assert f"[rank {rank}] step done on rank {rank} of 4" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_failing_rank_on_one_node_stops_every_node(ssh_workers, two_nodes):
    start = time.monotonic()
    done = launch_two_nodes(two_nodes, [FAIL, str(two_nodes), "3"])
    elapsed = time.monotonic() - start
    assert done.returncode == 3, done.stdout + done.stderr  # the rank's code, not torchrun's 1
    assert elapsed < 60  # the healthy ranks sleep 120 s
    assert "worker-2 (node 1) exited with code 3" in done.stderr
    pids = [int((two_nodes / f"pid.{r}").read_text()) for r in range(4)]
    assert wait_for(lambda: not any(map(proc_tree.is_alive, pids)), 10), pids


def test_unreachable_host_is_found_before_anything_starts(tmp_path):
    (tmp_path / "hostfile").write_text("no-such-host.invalid slots=1\nlocalhost slots=1\n")
    (tmp_path / "marker.py").write_text("open('started', 'w').close()\n")
    done = subprocess.run(LAUNCH + ["-H", "hostfile", "-e", "localhost", "marker.py"],
                          cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "cannot reach no-such-host.invalid (" in done.stderr
    assert "ssh -o BatchMode=yes HOST true" in done.stderr
    assert not (tmp_path / "started").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_nothing_is_left(tmp_path, sig):
    launcher = subprocess.Popen(LAUNCH + ["--num_procs", "2", "--master_port", str(free_port()),
                                          FAIL, str(tmp_path), "-1"],
                                cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid_files = [tmp_path / f"pid.{r}" for r in range(2)]
        assert wait_for(lambda: all(p.exists() for p in pid_files), 60)
        pids = [int(p.read_text()) for p in pid_files]
        launcher.send_signal(sig)
        assert launcher.wait(timeout=20) == 128 + sig
        assert not [pid for pid in pids if proc_tree.is_alive(pid)]
        assert f"received {signal.Signals(sig).name}" in launcher.stderr.read().decode()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_ranks_stop_when_the_launcher_is_killed(tmp_path):
    launcher = subprocess.Popen(LAUNCH + ["--num_procs", "2", "--master_port", str(free_port()),
                                          FAIL, str(tmp_path), "-1"],
                                cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        pid_files = [tmp_path / f"pid.{r}" for r in range(2)]
        assert wait_for(lambda: all(p.exists() for p in pid_files), 60)
        pids = [int(p.read_text()) for p in pid_files]
        launcher.kill()  # SIGKILL: the launcher cannot stop anything itself
        launcher.wait(timeout=10)
        assert wait_for(lambda: not any(proc_tree.is_alive(p) for p in pids), 15), \
            "ranks ran on after their launcher was killed"
    finally:
        for pid in pids:
            if proc_tree.is_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_supervise_returns_first_failure_and_stops_the_rest():
    def child(name, code):
        argv = [sys.executable, "-c", f"import time; time.sleep({0.2 if code else 60}); "
                                      f"raise SystemExit({code})"]
        return launch_runner.Child(name, subprocess.Popen(argv, start_new_session=True))
    children = [child("rank 0", 0), child("rank 1", 5)]
    start = time.monotonic()
    assert launch_runner.supervise(children, grace=2.0) == 5
    assert time.monotonic() - start < 10
    assert children[0].proc.returncode == -signal.SIGTERM


def test_rank_env_matches_torchrun():
    env = launch_runner.rank_env({"PATH": "/bin"}, rank=1, world_size=2, master_addr="h",
                                 master_port=7)
    assert env == {"PATH": "/bin", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
                   "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "MASTER_ADDR": "h",
                   "MASTER_PORT": "7", "OMP_NUM_THREADS": "1"}
    assert launch_runner.rank_env({"OMP_NUM_THREADS": "4"}, rank=0, world_size=2,
                                  master_addr="h", master_port=7)["OMP_NUM_THREADS"] == "4"
