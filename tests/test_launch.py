"""zerofx-launch's command line: input errors, --dry_run, and real single-node jobs
(tools/launch.py). Multi-node jobs over ssh are in test_launch_runner.py."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from zerofx.tools import launch, proc_tree

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_scripts")
TRAIN = os.path.join(SCRIPTS, "train_step.py")
FAIL = os.path.join(SCRIPTS, "fail_rank.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cli(args, *, cwd, timeout=90):
    """Run ``python -m zerofx.tools.launch ARGS`` in ``cwd``; every run is time-bounded."""
    return subprocess.run([sys.executable, "-m", "zerofx.tools.launch", *args], cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A working directory with a 2 x 4-slot hostfile and a script; no /job/hostfile."""
    (tmp_path / "hostfile").write_text("worker-0 slots=4\nworker-1 slots=4\n")
    (tmp_path / "train.py").write_text("print('hi')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "DEFAULT_HOSTFILE", str(tmp_path / "absent"))
    return tmp_path


def run_main(args, capsys):
    code = launch.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# --- dry runs through a real subprocess ---------------------------------------------------

def test_dry_run_prints_the_plan_as_json(job):
    done = launch_cli(["-H", "hostfile", "-e", "worker-0:0,1@worker-1:3", "--master_port",
                       "1234", "--dry_run", "train.py", "--lr", "0.1"], cwd=job, timeout=30)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["world_info"] == {"worker-0": [2, 3], "worker-1": [0, 1, 2]}
    assert list(plan["world_info"]) == ["worker-0", "worker-1"]
    assert plan["master_addr"] == "worker-0" and plan["master_port"] == 1234
    for node_rank, (host, nproc) in enumerate([("worker-0", 2), ("worker-1", 3)]):
        argv = plan["commands"][host]
        assert argv[0] == "ssh" and "BatchMode=yes" in argv and argv[-2] == host
        remote = argv[-1]
        assert f"cd {job}" in remote and f"exec {sys.executable} -u -m zerofx.tools.node_guard" \
            in remote
        for flag in ("--nnodes=2", f"--node_rank={node_rank}", f"--nproc_per_node={nproc}",
                     "--master_addr=worker-0", "--master_port=1234"):
            assert flag in remote
        assert remote.endswith("--tee=3 train.py --lr 0.1")


def test_dry_run_error_is_one_line_exit_2(job):
    done = launch_cli(["-H", "hostfile", "-i", "worker-0:9", "--dry_run", "train.py"], cwd=job,
                      timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("zerofx-launch: error: --include 'worker-0:9': worker-0 has "
                                  "no slot 9; hostfile line 1 ('worker-0 slots=4')")


# --- input errors, in process -------------------------------------------------------------

@pytest.mark.parametrize("args, culprit", [
    (["-H", "nope", "train.py"], "cannot read hostfile nope"),
    (["-H", "hostfile", "-i", "worker-0", "-e", "worker-1", "train.py"], "mutually exclusive"),
    (["-H", "hostfile", "-i", "worker-0", "--num_gpus", "1", "train.py"], "cannot be combined"),
    (["-H", "hostfile", "--num_nodes", "0", "train.py"], "--num_nodes 0: must be at least 1"),
    (["-H", "hostfile", "--num_gpus", "-2", "train.py"], "--num_gpus -2: must be at least 1"),
    (["--num_procs", "100000000", "train.py"], "--num_gpus 100000000: more than the 4096"),
    (["-H", "hostfile", "-i", "", "train.py"], "--include is empty"),
    (["-H", "hostfile", "-e", " ", "train.py"], "--exclude is empty"),
    (["-H", "hostfile", "--num_nodes", "3", "train.py"], "--num_nodes 3: between 1 and 2"),
    (["-H", "hostfile", "--master_port", "70000", "train.py"], "--master_port 70000"),
    (["-H", "hostfile", "--master_addr=-oProxy=x", "train.py"], "--master_addr '-oProxy=x'"),
    (["-H", "hostfile", "missing.py"], "script 'missing.py' not found"),
    (["-H", "hostfile", "--launcher", "rsh", "train.py"], "invalid choice: 'rsh'"),
    (["-H", "hostfile", "--num_nodes", "two", "train.py"], "invalid int value: 'two'"),
    (["-H", "hostfile"], "the following arguments are required: script"),
])
def test_bad_input_is_one_line_and_exit_2(job, capsys, args, culprit):
    code, out, err = run_main(["--dry_run", *args], capsys)  # before the script: ours
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zerofx-launch: error: "), err
    assert culprit in lines[0]


def test_bad_hostfile_line_names_file_line_and_text(job, capsys):
    (job / "bad").write_text("worker-0 slots=4\nworker-1 slots=four\n")
    code, _, err = run_main(["-H", "bad", "--dry_run", "train.py"], capsys)
    assert code == 2 and "bad line 2 ('worker-1 slots=four'): expected 'hostname slots=N'" in err


def test_bad_env_file_is_an_input_error(job, capsys):
    (job / ".zerofx_env").write_text("NOT VALID\n")
    code, _, err = run_main(["-H", "hostfile", "--dry_run", "train.py"], capsys)
    assert code == 2 and ".zerofx_env line 1 ('NOT VALID')" in err


def test_no_hostfile_means_local_processes_with_a_warning(job, capsys, monkeypatch, caplog):
    monkeypatch.setattr(launch, "local_gpu_ids", lambda environ: [])
    code, out, _ = run_main(["--num_procs", "3", "--dry_run", "train.py", "x"], capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan["world_info"] == {"localhost": [0, 1, 2]}
    assert plan["master_addr"] == "127.0.0.1"
    assert plan["commands"] == {"localhost": [sys.executable, "-u", "train.py", "x"]}
    assert "no hostfile" in caplog.text and "this machine only" in caplog.text


def test_num_nodes_and_num_gpus_select_first_hosts_and_slots(job, capsys):
    code, out, _ = run_main(["-H", "hostfile", "--num_nodes", "1", "--num_gpus", "2",
                             "--dry_run", "train.py"], capsys)
    assert code == 0 and json.loads(out)["world_info"] == {"worker-0": [0, 1]}


def test_pdsh_dry_run(job, capsys):
    code, out, _ = run_main(["-H", "hostfile", "--launcher", "pdsh", "--dry_run", "train.py"],
                            capsys)
    commands = json.loads(out)["commands"]
    assert code == 0 and commands["worker-1"][2:8] == ["pdsh", "-S", "-R", "ssh", "-w",
                                                        "worker-1"]


def test_local_gpu_ids_follow_cuda_visible_devices():
    assert launch.local_gpu_ids({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert launch.local_gpu_ids({"CUDA_VISIBLE_DEVICES": ""}) == []


# --- real single-node jobs ----------------------------------------------------------------

def reference_params(world_size: int) -> list[float]:
    """The step train_step.py takes, in one process: the mean loss over every rank's batch."""
    import torch
    import torch.nn.functional as F
    spec = importlib.util.spec_from_file_location("train_step", TRAIN)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    loss = sum(F.mse_loss(model(x), y) for x, y in map(script.batch, range(world_size)))
    (loss / world_size).backward()
    with torch.no_grad():
        return [v for p in model.parameters() for v in (p - 0.1 * p.grad).flatten().tolist()]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_rank_training_step_on_this_machine(tmp_path):
    port = free_port()
    done = launch_cli(["--num_procs", "2", "--master_port", str(port), TRAIN, str(tmp_path)],
                      cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == 2
        assert result["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": str(port)}
        assert f"[rank {rank}] step done on rank {rank} of 2" in done.stdout.splitlines()
    assert results[0]["params"] == results[1]["params"]
    assert results[0]["params"] == pytest.approx(reference_params(2), abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_failing_rank_stops_every_rank_and_sets_the_exit_code(tmp_path):
    start = time.monotonic()
    done = launch_cli(["--num_procs", "3", "--master_port", str(free_port()), FAIL,
                       str(tmp_path), "1"], cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert done.returncode == 3, done.stdout + done.stderr
    assert elapsed < 30  # the healthy ranks sleep 120 s: they were stopped, not waited for
    assert "rank 1 exited with code 3; stopping the other ranks" in done.stderr
    pids = [int((tmp_path / f"pid.{r}").read_text()) for r in range(3)]
    assert not [pid for pid in pids if proc_tree.is_alive(pid)]
