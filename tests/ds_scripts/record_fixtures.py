"""Record real DeepSpeed's numbers for the scripts in this folder.

Run with the Python of a virtual environment that has the real DeepSpeed (never the project's
own .venv), from the repository root:

    python3 -m venv /work/dsenv && /work/dsenv/bin/pip install torch==2.13.0 numpy
    DS_BUILD_OPS=0 /work/dsenv/bin/pip install --no-build-isolation deepspeed==0.19.8
    /work/dsenv/bin/pip install transformers==5.24.0
    DS_ACCELERATOR=cpu /work/dsenv/bin/python tests/ds_scripts/record_fixtures.py [NAME...]

Each script runs on 2 CPU ranks (gloo) under torchrun, once per entry of RUNS (in order: a
later run may resume from an earlier one's checkpoint), and the rank-0 JSON it writes goes
into tests/data/deepspeed_fixtures/NAME.json with the versions, the command and the date.
tests/test_deepspeed_scripts.py replays the same RUNS on zerofx and compares.
"""
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = REPO / "tests" / "data" / "deepspeed_fixtures"

# Script arguments per run; "{out}" is the JSON the run writes, "{tmp}" a folder shared by
# the runs of one script (checkpoints).
RUNS = {
    "cifar_style": [
        ["--deepspeed", "--dtype", "fp32", "--stage", "2", "--losses_out", "{out}"],
    ],
    "bert_style": [
        ["--checkpoint_dir", "{tmp}", "--num_iterations", "11", "--losses_out", "{out}"],
        ["--load_checkpoint_dir", "{tmp}/bert_pretrain.run", "--num_iterations", "15",
         "--losses_out", "{out}"],
    ],
}
WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(python: str, entry: list[str]) -> list[str]:
    """torchrun on 2 local ranks, each running `entry` (a script path and its arguments)."""
    return [python, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(WORLD_SIZE), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *entry]


def fill(args: list[str], out: Path, tmp: Path) -> list[str]:
    return [a.replace("{out}", str(out)).replace("{tmp}", str(tmp)) for a in args]


def record(name: str) -> dict:
    import deepspeed
    import torch

    script = HERE / f"{name}.py"
    runs = []
    with tempfile.TemporaryDirectory(prefix=f"ds-{name}-") as tmp:
        for i, args in enumerate(RUNS[name]):
            out = Path(tmp) / f"run{i}.json"
            cmd = torchrun_command(sys.executable, [str(script), *fill(args, out, Path(tmp))])
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
            runs.append({"args": args, "result": json.loads(out.read_text())})
    versions = {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                "python": platform.python_version()}
    if name == "bert_style":
        import transformers

        versions["transformers"] = transformers.__version__
    return {
        "script": f"tests/ds_scripts/{name}.py",
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": (f"DS_ACCELERATOR=cpu {sys.executable} -m torch.distributed.run --nnodes 1 "
                    f"--nproc_per_node {WORLD_SIZE} --master_addr 127.0.0.1 --master_port PORT "
                    f"tests/ds_scripts/{name}.py ARGS  (per run: args below, {{out}} and {{tmp}} "
                    f"filled in; recorded by tests/ds_scripts/record_fixtures.py)"),
        "world_size": WORLD_SIZE,
        "runs": runs,
    }


def main(names):
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name in names or RUNS:
        fixture = record(name)
        path = FIXTURES / f"{name}.json"
        path.write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
