"""zerofx-launch: start a training script on the slots of a hostfile (DeepSpeed's launcher).

    zerofx-launch [-H hostfile] [-i|-e filter] [--num_nodes N] [--num_gpus N] \\
        [--master_addr A] [--master_port P] [--launcher ssh|pdsh] [--dry_run] train.py [args]

One host that is this machine: the launcher starts the ranks itself, with torchrun's
environment. Several hosts: one torchrun per host over ssh (or pdsh). ``--dry_run`` prints
the plan as JSON and starts nothing. A bad input is one line on stderr and exit code 2; a
failed rank stops every rank and its exit code becomes the launcher's.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from zerofx.tools import hostfile, launch_env, launch_plan, launch_runner

log = logging.getLogger(__name__)

DEFAULT_HOSTFILE = "/job/hostfile"
DEFAULT_PORT = 29500  # torch.distributed's (and DeepSpeed's) default


class UsageError(ValueError):
    """A bad command line; the message is one line naming the culprit and the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block and exit itself
        raise UsageError(f"{message} (see zerofx-launch --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zerofx-launch", allow_abbrev=False,
                description="Launch a training script on the slots of a hostfile.")
    p.add_argument("-H", "--hostfile", help=f"lines 'hostname slots=N' (default "
                   f"{DEFAULT_HOSTFILE}; without one, only this machine is used)")
    p.add_argument("-i", "--include", help="only these: host[:slot[,slot...]][@host...]")
    p.add_argument("-e", "--exclude", help="all but these: host[:slot[,slot...]][@host...]")
    p.add_argument("--num_nodes", type=int, help="use the first N hosts")
    p.add_argument("--num_gpus", "--num_procs", dest="num_gpus", type=int,
                   help="use the first N slots of each host (without GPUs: N processes)")
    p.add_argument("--master_addr", help="rank 0's address as the others see it "
                   "(default: the first host)")
    p.add_argument("--master_port", type=int, default=DEFAULT_PORT)
    p.add_argument("--launcher", choices=("ssh", "pdsh"), default="ssh",
                   help="how to start the remote hosts (default ssh)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan as JSON and exit; contacts no host")
    p.add_argument("script", help="the training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="passed to the script")
    return p


def local_gpu_ids(environ: dict[str, str]) -> list[str]:
    """This machine's visible NVIDIA GPUs, as CUDA_VISIBLE_DEVICES entries (none: [])."""
    # Read from the driver, not torch: importing torch would cost the launcher seconds.
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def check_args(args: argparse.Namespace) -> None:
    """Checks argparse cannot express; raises UsageError."""
    for flag in ("num_nodes", "num_gpus"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} {value}: must be at least 1")
    if args.num_gpus is not None and args.num_gpus > hostfile.MAX_SLOTS:
        raise UsageError(f"--num_gpus {args.num_gpus}: more than the {hostfile.MAX_SLOTS} "
                         f"processes one host can run")
    if not 1 <= args.master_port <= 65535:
        raise UsageError(f"--master_port {args.master_port}: must be between 1 and 65535")
    if args.master_addr is not None and not _is_address(args.master_addr):
        raise UsageError(f"--master_addr {args.master_addr!r}: not a hostname or IP address")
    if not os.path.isfile(args.script):
        raise UsageError(f"script {args.script!r} not found in {os.getcwd()}; give its path "
                         "(remote hosts run it from the same directory)")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return hostfile.is_valid_hostname(text)


def load_hosts(args: argparse.Namespace, *, gpu_ids: list[str]) -> dict[str, hostfile.Host]:
    """The hostfile's hosts, or this machine alone when the default hostfile is absent."""
    if args.hostfile is not None or os.path.exists(DEFAULT_HOSTFILE):
        return hostfile.read_hostfile(args.hostfile or DEFAULT_HOSTFILE)
    slots = len(gpu_ids) or args.num_gpus or 1  # without GPUs, slots are processes
    log.warning("no hostfile at %s: using this machine only (%d %s); pass -H/--hostfile "
                "for more", DEFAULT_HOSTFILE, slots, "GPU(s)" if gpu_ids else
                "process(es)" if args.num_gpus else "process(es); --num_procs N for more")
    return hostfile.local_hosts(slots)


def resolve(args: argparse.Namespace, *, environ: dict[str, str],
            gpu_ids: list[str]) -> launch_plan.LaunchPlan:
    """From parsed arguments to the full plan; raises the one-line input errors."""
    check_args(args)
    hosts = load_hosts(args, gpu_ids=gpu_ids)
    world_info = hostfile.select(hosts, include=args.include, exclude=args.exclude,
                                 num_nodes=args.num_nodes, num_gpus=args.num_gpus)
    local = launch_plan.is_local_run(world_info)
    # A single local host talks over loopback; otherwise rank 0's host, as DeepSpeed does.
    master_addr = args.master_addr or ("127.0.0.1" if local else next(iter(world_info)))
    cwd = os.getcwd()
    exports = {} if local else launch_env.remote_exports(
        environ, cwd=cwd, home=os.path.expanduser("~"))
    return launch_plan.build_plan(
        world_info, script_argv=[args.script, *args.script_args], master_addr=master_addr,
        master_port=args.master_port, launcher=args.launcher, python=sys.executable,
        cwd=cwd, exports=exports)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zerofx-launch``; returns the exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="zerofx-launch: %(message)s", level=logging.INFO)
    environ = dict(os.environ)
    gpu_ids = local_gpu_ids(environ)
    try:
        args = build_parser().parse_args(argv)
        plan = resolve(args, environ=environ, gpu_ids=gpu_ids)
        if args.dry_run:
            print(plan.to_json())
            return 0
        return launch_runner.run(plan, environ=environ, gpu_ids=gpu_ids)
    except (UsageError, hostfile.HostfileError, launch_env.EnvFileError,
            launch_runner.LaunchError) as e:
        print(f"zerofx-launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
