"""A model whose optimizer state exceeds this machine's memory, trained: GPT-style, 2 ranks
(gloo), built under ``zerofx.zero.Init(remote_device="nvme")``, ZeRO stage 3 with
offload_optimizer and offload_param on NVMe, 5 steps, beside the disk's limit.

    python benchmarks/bench_offload_big.py --layers 8 --dim 1536 --nvme-path /work/tmp

Per run: parameters, the optimizer state on disk (12 bytes per parameter, all ranks) against
MemTotal, construction and initialize time, each rank's anonymous memory after construction
and at its peak, the median step over steps 2-5 (step 1 compiles), and the disk limit: the
bytes the optimizer steps of all ranks read and write per step (the ranks share one disk)
over the read and write bandwidth measured in the same run (zerofx.planner.rates
.measure_disk, buffered 1 MiB calls over a file written once before: the offload's way, as
benchmarks/bench_offload.py measures it; and with O_DIRECT, the device past the page cache,
the limit a state larger than memory meets). Every rank watches MemAvailable and exits (the run
fails, cleanly) if it drops under --min-available GiB: the box is shared.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from zerofx.runtime.host_memory import meminfo, process_status

GIB = float(1 << 30)


def _meminfo(key: str) -> int:
    return (meminfo() or {})[key]


def _status(key: str) -> int:
    return (process_status() or {}).get(key, 0)


class _Watch:
    """Samples this rank's RssAnon (its peak) and the machine's MemAvailable; below the
    floor the rank exits at once (run_ranks then stops the others) instead of letting the
    OOM killer choose among the box's processes."""

    def __init__(self, floor_bytes: float, rank: int):
        self.floor, self.rank, self.peak = floor_bytes, rank, 0
        self.lowest = _meminfo("MemAvailable")  # machine-wide: other users count too
        threading.Thread(target=self._run, daemon=True).start()

    def take_peak(self) -> int:
        """The peak since the last call (then starts a new one)."""
        peak, self.peak = max(self.peak, _status("RssAnon")), 0
        return peak

    def _run(self):
        while True:
            self.peak = max(self.peak, _status("RssAnon"))
            avail = _meminfo("MemAvailable")
            self.lowest = min(self.lowest, avail)
            if avail < self.floor:
                print(f"rank {self.rank}: MemAvailable {avail / GIB:.2f} GiB < "
                      f"{self.floor / GIB:.2f} GiB: aborting", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.05)


def _gpt_class():
    path = Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py"
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT


def _config(args):
    nvme = args.nvme_path
    zero = {"stage": 3, "reduce_bucket_size": args.bucket,
            "stage3_prefetch_bucket_size": args.bucket, "sub_group_size": args.chunk,
            # gathered weights alive at once: a few buckets, not the whole model
            "stage3_max_live_parameters": args.max_live,
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme,
                                  "buffer_count": args.buffers},
            "offload_param": {"device": "nvme", "nvme_path": nvme,
                              "buffer_size": max(args.bucket, 100_000_000),
                              "max_in_cpu": 1 << 40}}
    # the shm form's mirrors are 2 bytes per parameter each in /dev/shm (memory that cannot
    # be reclaimed): pinned to gloo forms here, whose temporaries are a bucket
    forms = {"reduce_form": args.form, "gather_form": args.form}
    return {"bf16": {"enabled": True}, "zero_optimization": zero, "zerofx": forms,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}}


def _rank_body(rank, world, args):
    import zerofx

    watch = _Watch(args.min_available * GIB, rank)
    cfg = _config(args)
    torch.manual_seed(rank)
    anon0 = _status("RssAnon")
    t0 = time.perf_counter()
    with zerofx.zero.Init(config_dict_or_path=cfg):  # offload_param nvme: built in files
        model = _gpt_class()(args.vocab, block=args.ctx, d=args.dim,
                             heads=max(1, args.dim // 128), layers=args.layers)
    built = time.perf_counter() - t0
    anon_built = _status("RssAnon") - anon0
    t0 = time.perf_counter()
    rt = zerofx.ZeroRuntime(model, cfg)
    init = time.perf_counter() - t0
    stream = rt.state.offload.stream
    filled = stream.bytes_read + stream.bytes_written  # initialize wrote the master: not a step
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    g = torch.Generator().manual_seed(rank)
    steps, losses, phases = [], [], {"initialize": watch.take_peak()}
    opt_times = []  # the optimizer step alone: where the state moves
    for _ in range(args.steps):
        idx = torch.randint(args.vocab, (args.batch, args.ctx), generator=g)
        t0 = time.perf_counter()
        with rt.shape_carriers():
            loss = compiled(idx, torch.roll(idx, -1, 1))
        rt.backward(loss)
        fb = "forward+backward" if steps else "first forward+backward (compiles)"
        phases[fb] = max(phases.get(fb, 0), watch.take_peak())
        t1 = time.perf_counter()
        rt.step()
        opt_times.append(time.perf_counter() - t1)
        phases["optimizer step"] = max(phases.get("optimizer step", 0), watch.take_peak())
        steps.append(time.perf_counter() - t0)
        losses.append(loss.item())
    off, store = rt.state.offload, rt.state.params
    out = dict(numel=rt.plan.numel, state=off.file.nbytes, params_file=store.file.nbytes,
               moved=(off.stream.bytes_read + off.stream.bytes_written - filled) / args.steps,
               steps=steps, opt_times=opt_times, losses=losses, built=built, init=init, anon_built=anon_built,
               anon_peak=max(phases.values()), phases=phases, held=rt.state_bytes(),
               shard=rt.plan.shard_numel, lowest=watch.lowest, shmem=_status("RssShmem"))
    rt.close()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1 << 22, help="sub_group_size (elements)")
    p.add_argument("--buffers", type=int, default=4, help="offload_optimizer.buffer_count")
    p.add_argument("--bucket", type=int, default=50_000_000,
                   help="stage3_prefetch_bucket_size and reduce_bucket_size (elements)")
    p.add_argument("--max-live", type=int, default=150_000_000,
                   help="stage3_max_live_parameters (elements)")
    p.add_argument("--form", default="p2p", help="zerofx.reduce_form and gather_form")
    p.add_argument("--nvme-path", required=True)
    p.add_argument("--min-available", type=float, default=2.0,
                   help="GiB of MemAvailable under which every rank aborts")
    p.add_argument("--timeout", type=float, default=7200.0)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from multiproc import run_ranks

    from zerofx.planner.rates import measure_disk

    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    ranks = run_ranks(_rank_body, args.world, args=(args,), timeout_s=args.timeout,
                      fresh=True)
    _report(args, ranks, measure_disk)


def _report(args, ranks, measure_disk) -> None:
    state = sum(r["state"] for r in ranks)
    # the disk measured after training, over a file of one rank's state (at most 8 GiB)
    wb, rb = measure_disk(args.nvme_path, min(ranks[0]["state"], 8 << 30), 1 << 20,
                          direct=False)
    # the device past the page cache: what a state larger than memory meets
    wd, rd = measure_disk(args.nvme_path, min(ranks[0]["state"], 2 << 30), 1 << 20,
                          direct=True)
    moved = sum(r["moved"] for r in ranks)  # Adam: the whole state read and written once
    limit = moved / 2 / rb + moved / 2 / wb
    limit_direct = moved / 2 / rd + moved / 2 / wd
    step = statistics.median(s for r in ranks for s in r["steps"][1:])
    total = _meminfo("MemTotal")
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print(f"{ranks[0]['numel'] / 1e9:.3f}B parameters, {args.world} ranks, ZeRO-3 bf16 AdamW, "
          f"zero.Init(nvme) + offload_optimizer nvme + offload_param nvme, seq {args.ctx}, "
          f"micro batch {args.batch}; filesystem of {args.nvme_path}: buffered write "
          f"{wb / GIB:.2f} GiB/s, read {rb / GIB:.2f} GiB/s; O_DIRECT write {wd / GIB:.2f} "
          f"GiB/s, read {rd / GIB:.2f} GiB/s")
    print("| parameters | optimizer state on disk (GiB) | MemTotal (GiB) | state / MemTotal "
          "| build (s) | initialize (s) | RssAnon after build, per rank (GiB) "
          "| RssAnon peak, per rank (GiB) | step (s) | state moved per step (GiB) "
          "| disk limit, buffered (s) | step / limit | disk limit, O_DIRECT (s) "
          "| step / O_DIRECT limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {ranks[0]['numel'] / 1e9:.3f}B | {state / GIB:.2f} | {total / GIB:.1f} "
          f"| {state / total:.2f} | {max(r['built'] for r in ranks):.1f} "
          f"| {max(r['init'] for r in ranks):.1f} "
          f"| {max(r['anon_built'] for r in ranks) / GIB:.2f} "
          f"| {max(r['anon_peak'] for r in ranks) / GIB:.2f} | {step:.2f} "
          f"| {moved / GIB:.2f} | {limit:.2f} | {step / limit:.2f} | {limit_direct:.2f} "
          f"| {step / limit_direct:.2f} |")
    for r, res in enumerate(ranks):
        print(f"rank {r}: shard {res['shard'] / 1e6:.1f}M elements; peak RssAnon (GiB) by "
              f"phase: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in res["phases"].items())
              + f"; RssShmem at the end {res['shmem'] / GIB:.2f}; lowest MemAvailable seen "
              f"{res['lowest'] / GIB:.1f}")
    # the state moves in the optimizer step: it alone beside the disk limit (the step above
    # also holds the forward and backward, with their parameter reads and gathers)
    opt = statistics.median(s for r in ranks for s in r["opt_times"][1:])
    print(f"optimizer step alone (median, steps 2-{args.steps}): {opt:.2f} s = "
          f"{opt / limit:.2f}x the buffered limit, {opt / limit_direct:.2f}x the O_DIRECT limit; "
          f"forward+backward {step - opt:.2f} s")
    print(f"losses rank 0: {[round(x, 4) for x in ranks[0]['losses']]}")


if __name__ == "__main__":
    main()
