"""The launch plan: from a resource map to the exact command each host runs.

One host that is this machine runs locally: the launcher starts its ranks itself. Anything
else runs one torchrun per host over ssh (or pdsh), wrapped in ``zerofx.tools.node_guard``
so that the remote ranks die when the connection or the launcher does:

    ssh -o BatchMode=yes ... worker-1 'cd /job && export PATH=... && exec python -u -m
        zerofx.tools.node_guard --watch-stdin -- python -u -m zerofx.tools.torchrun
        --nnodes=2 --node_rank=0 --nproc_per_node=2 --master_addr=... train.py --lr 1'

Everything user-given that reaches a remote shell goes through ``shlex.quote``.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import socket

from zerofx.tools.hostfile import Resources

SSH_OPTIONS = (
    "-o", "BatchMode=yes",            # never prompt: a prompt would hang a batch job
    "-o", "ConnectTimeout=10",
    "-o", "ServerAliveInterval=15",   # notice a dead peer within about a minute
    "-o", "ServerAliveCountMax=4",
)
# torchrun prefixes every line of its workers with this (``--tee 3`` turns prefixing on).
RANK_PREFIX_TEMPLATE = "[rank ${rank}] "
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch does, decided before anything starts; ``--dry_run`` prints it."""

    world_info: Resources
    master_addr: str
    master_port: int
    commands: dict[str, list[str]]
    local: bool  # True: the launcher starts the ranks of the only host itself
    launcher: str

    def to_json(self) -> str:
        """The plan as printed by ``--dry_run``: hosts in rank order."""
        return json.dumps({"world_info": self.world_info, "master_addr": self.master_addr,
                           "master_port": self.master_port, "commands": self.commands},
                          indent=2)


def is_this_machine(host: str) -> bool:
    """True when ``host`` names the machine the launcher runs on."""
    name = socket.gethostname()
    return host in LOCAL_NAMES or host in (name, name.split(".")[0])


def is_local_run(world_info: Resources) -> bool:
    """True when the launcher starts the ranks itself: one host, and it is this machine."""
    return len(world_info) == 1 and is_this_machine(next(iter(world_info)))


def build_plan(world_info: Resources, *, script_argv: list[str], master_addr: str,
               master_port: int, launcher: str, python: str, cwd: str,
               exports: dict[str, str]) -> LaunchPlan:
    """Decide local vs remote and build every host's argv."""
    hosts = list(world_info)
    if is_local_run(world_info):
        commands = {hosts[0]: [python, "-u", *script_argv]}
        return LaunchPlan(world_info, master_addr, master_port, commands, True, launcher)
    commands = {}
    for node_rank, host in enumerate(hosts):
        torchrun = torchrun_argv(script_argv, python=python, nnodes=len(hosts),
                                 node_rank=node_rank, nproc=len(world_info[host]),
                                 master_addr=master_addr, master_port=master_port)
        host_exports = {**exports, "CUDA_VISIBLE_DEVICES": ",".join(map(str, world_info[host])),
                        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": RANK_PREFIX_TEMPLATE}
        guard = [python, "-u", "-m", "zerofx.tools.node_guard"]
        guard += ["--watch-stdin", "--"] if launcher == "ssh" else ["--"]
        remote = remote_shell_command(guard + torchrun, cwd=cwd, exports=host_exports)
        commands[host] = ssh_argv(host, remote) if launcher == "ssh" else pdsh_argv(host, remote)
    return LaunchPlan(world_info, master_addr, master_port, commands, False, launcher)


def torchrun_argv(script_argv: list[str], *, python: str, nnodes: int, node_rank: int,
                  nproc: int, master_addr: str, master_port: int) -> list[str]:
    """One host's torchrun: static rendezvous at the master, ranks in node order."""
    # Heterogeneous hosts are fine: torchrun gives node k the global ranks that follow the
    # local ranks of nodes 0..k-1, matching world_info's order.
    return [python, "-u", "-m", "zerofx.tools.torchrun", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", f"--nproc_per_node={nproc}",
            f"--master_addr={master_addr}", f"--master_port={master_port}", "--tee=3",
            *script_argv]


def remote_shell_command(argv: list[str], *, cwd: str, exports: dict[str, str]) -> str:
    """A POSIX sh command line: same working directory, explicit exports, then ``exec``."""
    # exec: the guard must be the direct child of sshd so it notices when sshd goes away.
    parts = [f"cd {shlex.quote(cwd)}"]
    if exports:
        parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items()))
    parts.append("exec " + shlex.join(argv))
    return " && ".join(parts)


def ssh_argv(host: str, remote_command: str) -> list[str]:
    """ssh to ``host`` (already validated: no leading '-') running ``remote_command``."""
    return ["ssh", *SSH_OPTIONS, host, remote_command]


def pdsh_argv(host: str, remote_command: str) -> list[str]:
    """pdsh over ssh to one host; -S makes pdsh exit with the remote command's status."""
    # pdsh's ssh module reads extra ssh options from this variable; BatchMode etc. as for ssh.
    options = "PDSH_SSH_ARGS_APPEND=" + " ".join(SSH_OPTIONS)
    return ["env", options, "pdsh", "-S", "-R", "ssh", "-w", host, remote_command]


def reachability_argv(host: str) -> list[str]:
    """The quick check run on every host before anything starts."""
    return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, "true"]
