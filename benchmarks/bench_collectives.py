"""gloo collectives on this machine: which way to reduce-scatter and all-gather a bucket.

    python benchmarks/bench_collectives.py [--numel 17000000] [--ranks 2]

Times (median of 7) reduce_scatter_tensor, all_to_all_single + local sum, all_reduce and
all_gather_into_tensor on a bf16 buffer, all-reduce forms of both, and point-to-point forms
of both (each piece sent straight to its owner / to every rank), and the shared-memory forms
for ranks on one host (zerofx/runtime/comm/shm.py): the candidates zerofx's runtime times
at startup and chooses between (zerofx/runtime/comm/forms.py).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from multiproc import run_ranks  # noqa: E402


def _cases(flat, out, world, rank):
    def a2a():
        recv = torch.empty_like(flat)
        dist.all_to_all_single(recv, flat)
        torch.sum(recv.view(world, -1), dim=0, out=out)

    def gather_by_allreduce():
        rows = flat.new_zeros(world, out.numel())
        rows[rank].copy_(out)
        dist.all_reduce(rows)

    def p2p_gather():
        # every rank sends its piece to each other rank directly: N-1 sends and receives
        rows = flat.view(world, -1)
        ops = [dist.P2POp(dist.isend, out, peer) for peer in range(world) if peer != rank]
        ops += [dist.P2POp(dist.irecv, rows[peer], peer) for peer in range(world) if peer != rank]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        rows[rank].copy_(out)

    def p2p_reduce():
        rows = flat.view(world, -1)
        recv = flat.new_empty(world - 1, out.numel())
        peers = [peer for peer in range(world) if peer != rank]
        ops = [dist.P2POp(dist.isend, rows[peer], peer) for peer in peers]
        ops += [dist.P2POp(dist.irecv, recv[i], peer) for i, peer in enumerate(peers)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        torch.add(rows[rank], recv.sum(0) if world > 2 else recv[0], out=out)

    from zerofx.runtime.comm import shm as shm_comm
    from zerofx.runtime.comm.forms import start_gather, start_reduce

    mirror = shm_comm.ShmMirror(None, flat.numel(), flat.dtype, 1)

    def shm_reduce():
        start_reduce("shm", flat, out, None, mirror=mirror).wait()

    def shm_gather():
        start_gather("shm", out, flat, None, mirror=mirror).wait()

    shm = {"shared memory: write the peer's piece, add the peer's (a reduce-scatter)":
           shm_reduce} if world == 2 else {}
    shm["shared memory: write own piece, copy all out (an all-gather)"] = shm_gather
    return {**shm, "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(out, flat),
            "p2p send/recv of each piece + local sum (a reduce-scatter)": p2p_reduce,
            "p2p send/recv of each piece (an all-gather)": p2p_gather,
            "all_to_all + local sum": a2a,
            "all_reduce (zerofx reduce-scatter on gloo)": lambda: dist.all_reduce(flat),
            "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(flat, out),
            "all_reduce of zeros + own row (an all-gather alternative)": gather_by_allreduce}


def _body(rank, world, numel):
    from zerofx.runtime.comm.dist import init_distributed

    init_distributed()
    flat = torch.randn(numel).bfloat16()
    out = torch.empty(numel // world, dtype=torch.bfloat16)
    times = {}
    for name, fn in _cases(flat, out, world, rank).items():
        samples = []
        for _ in range(8):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples[1:]) * 1e3
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=17_000_000)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args(argv)
    results = run_ranks(_body, args.ranks, args=(args.numel,), timeout_s=600, fresh=True)
    print(f"\n{args.numel} bf16 elements, {args.ranks} ranks (gloo), torch {torch.__version__}\n")
    print("| collective | ms (median, slowest rank) |\n|---|---|")
    for name in results[0]:
        print(f"| {name} | {max(r[name] for r in results):.1f} |")


if __name__ == "__main__":
    main()
