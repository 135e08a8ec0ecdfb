"""Control for passes/gather_out.py: torch's functional all-gather on gloo, with many small
gathers in flight, in its plain form and in the _out form the pass rewrites it to.

    python benchmarks/gloo_gather_race.py [--trials 3] [--rounds 20000] [--world 2]

Each trial starts ``world`` fresh gloo ranks that run ``rounds`` rounds of 16 one-element
gathers started together, then waited (values checked). ``all_gather_into_tensor`` goes
through gloo's coalesced all-gather: on torch 2.13 a rank aborts ("malloc(): unaligned
tcache chunk detected") when two of its worker threads finish such works at once. The
``_out`` form runs the plain all-gather. Prints, per form, how many trials finished and the
round each aborted one had passed (rank 0's last report, every 250 rounds).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FORMS = ("all_gather_into_tensor", "all_gather_into_tensor_out")


def _rank(rank, world, port, form, rounds, progress):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # an aborted rank's stacks: not the table
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    name, ops = dist.group.WORLD.group_name, torch.ops._c10d_functional
    want = torch.arange(1, world + 1, dtype=torch.float32)
    mine = torch.full((1,), float(rank + 1))
    for i in range(rounds):
        if form == FORMS[0]:
            outs = [ops.all_gather_into_tensor(mine, world, name) for _ in range(16)]
        else:
            outs = [ops.all_gather_into_tensor_out(mine, world, name, out=torch.empty(world))
                    for _ in range(16)]
        for o in outs:
            assert torch.equal(ops.wait_tensor(o), want)
        if rank == 0 and i % 250 == 0:
            progress.value = i
    dist.destroy_process_group()


def trial(form: str, rounds: int, world: int) -> tuple[bool, int, float]:
    """(finished, last round rank 0 reported, seconds) of one trial."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    progress = ctx.Value("l", 0)
    t0 = time.monotonic()
    procs = [ctx.Process(target=_rank, args=(r, world, port, form, rounds, progress))
             for r in range(world)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        time.sleep(0.2)
        if any(p.exitcode not in (None, 0) for p in procs):  # its peers would wait on it
            for q in procs:
                q.kill()
    for p in procs:
        p.join()
    ok = all(p.exitcode == 0 for p in procs)
    return ok, rounds if ok else progress.value, time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {args.world} ranks, {args.rounds} rounds of 16 gathers "
          f"in flight, {args.trials} trials per form", flush=True)
    for form in FORMS:
        runs = [trial(form, args.rounds, args.world) for _ in range(args.trials)]
        done = sum(ok for ok, _, _ in runs)
        aborted = [f"~{at}" for ok, at, _ in runs if not ok]
        print(f"{form:<28} finished {done}/{args.trials}"
              + (f"; aborted past round {', '.join(aborted)}" if aborted else "")
              + f"  ({sum(t for _, _, t in runs):.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
