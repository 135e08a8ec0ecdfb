"""The per-host commands of a launch plan (tools/launch_plan.py)."""
import json
import shlex

from zerofx.tools import launch_plan

PY = "/opt/venv/bin/python"


def plan(world_info, *, launcher="ssh", script_argv=("train.py",), exports=None):
    return launch_plan.build_plan(world_info, script_argv=list(script_argv),
                                  master_addr="10.0.0.1", master_port=29500, launcher=launcher,
                                  python=PY, cwd="/job dir", exports=exports or {})


def remote_argv(command: str) -> tuple[list[str], list[str]]:
    """Split a remote shell command into its prefix words and the exec'd argv."""
    words = shlex.split(command)
    at = words.index("exec")
    return words[:at], words[at + 1:]


def test_single_local_host_runs_locally():
    p = plan({"localhost": [0, 1]}, script_argv=["train.py", "--lr", "1"])
    assert p.local and p.commands == {"localhost": [PY, "-u", "train.py", "--lr", "1"]}


def test_one_remote_host_goes_over_ssh():
    p = plan({"worker-7": [0]})
    assert not p.local and p.commands["worker-7"][0] == "ssh"


def test_multi_node_torchrun_per_host():
    p = plan({"a": [0, 1, 2], "b": [1]}, exports={"PATH": "/opt/venv/bin:/usr/bin"})
    assert list(p.commands) == ["a", "b"]
    for node_rank, (host, nproc, visible) in enumerate([("a", 3, "0,1,2"), ("b", 1, "1")]):
        argv = p.commands[host]
        assert argv[:2] == ["ssh", "-o"] and "BatchMode=yes" in argv and argv[-2] == host
        prefix, run = remote_argv(argv[-1])
        assert prefix[:3] == ["cd", "/job dir", "&&"]
        assert "PATH=/opt/venv/bin:/usr/bin" in prefix
        assert f"CUDA_VISIBLE_DEVICES={visible}" in prefix
        assert "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=[rank ${rank}] " in prefix
        guard_end = run.index("--")
        assert run[:guard_end] == [PY, "-u", "-m", "zerofx.tools.node_guard", "--watch-stdin"]
        assert run[guard_end + 1:] == [
            PY, "-u", "-m", "zerofx.tools.torchrun", "--nnodes=2", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", "--master_addr=10.0.0.1", "--master_port=29500",
            "--tee=3", "train.py"]


def test_user_text_is_quoted_for_the_remote_shell():
    nasty = ["train.py", "$(touch /tmp/pwned)", "a b", "'; rm -rf ~; '", "`id`", "&&"]
    p = plan({"a": [0], "b": [0]}, script_argv=nasty, exports={"X": "$HOME; echo hi"})
    prefix, run = remote_argv(p.commands["a"][-1])
    assert run[-len(nasty):] == nasty
    assert "X=$HOME; echo hi" in prefix


def test_pdsh_commands():
    p = plan({"a": [0], "b": [0, 1]}, launcher="pdsh")
    argv = p.commands["b"]
    assert argv[0] == "env" and argv[1].startswith("PDSH_SSH_ARGS_APPEND=-o BatchMode=yes")
    assert argv[2:8] == ["pdsh", "-S", "-R", "ssh", "-w", "b"]
    _, run = remote_argv(argv[-1])
    assert "--watch-stdin" not in run  # pdsh does not forward stdin; the guard watches its parent
    assert "--node_rank=1" in run and "--nproc_per_node=2" in run


def test_to_json_keys_and_rank_order():
    p = plan({"b": [1], "a": [0]})
    data = json.loads(p.to_json())
    assert list(data) == ["world_info", "master_addr", "master_port", "commands"]
    assert list(data["world_info"]) == ["b", "a"] and list(data["commands"]) == ["b", "a"]


def test_is_this_machine():
    import socket
    assert launch_plan.is_this_machine("localhost")
    assert launch_plan.is_this_machine(socket.gethostname())
    assert not launch_plan.is_this_machine("worker-1")
