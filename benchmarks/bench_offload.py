"""NVMe optimizer offload: a GPT-style model trained 5 steps with its optimizer state in a file
under ``--nvme-path`` against the same training in memory, beside the disk's limit.

    python benchmarks/bench_offload.py [--layers 8] [--dim 768] [--nvme-path /tmp]

One process, ZeRO stage 1 (a single rank owns the whole shard), bf16, AdamW. Per run: the
median step (forward + backward + optimizer step) and optimizer step over steps 2-5 (step 1
compiles). The limit is the physical one: the state bytes the offloaded step moves (read
12 bytes and write 12 bytes per parameter for Adam) over the read and write bandwidth of
the same filesystem, measured in the same run the way the offload moves bytes (buffered
1 MiB pread/pwrite calls over a file of the state's size that was written once before, as
the offload's file is), and also with O_DIRECT (the device itself, past the page cache).
Prints a markdown table.

    python benchmarks/bench_offload.py --params [--layers 4] [--dim 512] [--param-chunk N] \
        [--nvme-path /tmp]

Stage 3's parameters on NVMe (offload_param): the same GPT on 2 ranks (gloo) at ZeRO stage 3,
with the 16-bit parameter shard in memory and in a file; per rank the training state it
holds (rt.state_bytes(): parameters, gradients, optimizer state, offload buffers), how far
the resident set rises during the optimizer step (the kernel's high-water mark VmHWM,
reset through /proc/self/clear_refs before each step, over VmRSS then; allocations of
128 KiB or more mapped on their own, so a temporary always shows), the parameter store's
own count of what the step holds, and the median step over steps 2-5. Prints a second table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _gpt(args):
    """The main job's GPT (examples/train_gpt.py), at this benchmark's size."""
    path = Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py"
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT(args.vocab, block=args.ctx, d=args.dim, heads=max(1, args.dim // 64),
                      layers=args.layers)


def _train(args, nvme: str | None):
    import ctypes

    import zerofx

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: no heap reuse
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _gpt(args)
    zero = {"stage": 1, "reduce_bucket_size": 50_000_000}
    if nvme:
        zero.update(sub_group_size=args.chunk, offload_optimizer={
            "device": "nvme", "nvme_path": nvme, "buffer_count": args.buffers})
    cfg = {"bf16": {"enabled": True}, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}}
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    g = torch.Generator().manual_seed(0)
    steps, opt_steps, losses = [], [], []
    for _ in range(args.steps):
        idx = torch.randint(args.vocab, (args.batch, args.ctx), generator=g)
        t0 = time.perf_counter()
        loss = compiled(idx, torch.roll(idx, -1, 1))
        loss.backward()
        t1 = time.perf_counter()
        rt.step()
        t2 = time.perf_counter()
        steps.append(t2 - t0)
        opt_steps.append(t2 - t1)
        losses.append(loss.item())
    off = rt.state.offload
    moved = (off.stream.bytes_read + off.stream.bytes_written) / args.steps if off else 0
    out = dict(numel=rt.plan.numel, step=statistics.median(steps[1:]),
               opt=statistics.median(opt_steps[1:]), losses=losses, moved=moved,
               state=12 * rt.plan.shard_numel, held=rt.state_bytes(),
               chunks=len(off.chunks) if off else 0)
    rt.close()
    return out


def _bandwidth(path: str, nbytes: int, chunk_bytes: int, *, direct: bool) -> tuple[float, float]:
    """(write, read) bytes/s of ``nbytes`` through one file under ``path``, in chunks: the
    planner's disk measurement, uncached (each call measures again)."""
    from zerofx.planner.rates import measure_disk

    return measure_disk(path, nbytes, chunk_bytes, direct=direct)


def _stage3_body(rank, world, args, nvme):
    """One rank of the --params comparison: (resident bytes, median step, losses)."""
    import ctypes

    import zerofx

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: no heap reuse
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _gpt(args)
    zero = {"stage": 3, "reduce_bucket_size": args.bucket,
            "stage3_prefetch_bucket_size": args.bucket, "sub_group_size": args.param_chunk}
    if nvme:
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme,
                                 "buffer_count": args.param_buffers}
    rt = zerofx.ZeroRuntime(model, {"bf16": {"enabled": True}, "zero_optimization": zero,
                                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}})
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    g = torch.Generator().manual_seed(rank)
    steps, losses, grown = [], [], []
    for _ in range(args.steps):
        idx = torch.randint(args.vocab, (args.batch, args.ctx), generator=g)
        t0 = time.perf_counter()
        with rt.shape_carriers():
            loss = compiled(idx, torch.roll(idx, -1, 1))
        loss.backward()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        rt.step()
        grown.append((_status_kib("VmHWM") - before) * 1024)
        steps.append(time.perf_counter() - t0)
        losses.append(loss.item())
    store = rt.state.params
    out = dict(held=rt.state_bytes(), step=statistics.median(steps[1:]), losses=losses,
               shard=rt.plan.shard_numel * 2, numel=rt.plan.numel,
               buffers=store.memory_bytes() if store else 0, buckets=len(rt.plan.buckets),
               peak=store.peak_buffers if store else 0, cap=store.cap * 2 if store else 0,
               step_grown=max(grown[1:]), step_counted=store.peak_step_bytes if store else 0,
               step_chunks=len(store.chunks) if store else 0)
    rt.close()
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1])


def _params_table(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from multiproc import run_ranks

    runs = {name: run_ranks(_stage3_body, 2, args=(args, nvme), timeout_s=900, fresh=True)
            for name, nvme in (("in memory", None), ("offload_param nvme", args.nvme_path))}
    for a, b in zip(*runs.values()):
        assert a["losses"] == b["losses"], "offloaded parameters must give the same losses"
    mib = 2 ** 20
    first = runs["in memory"][0]
    print(f"{first['numel'] / 1e6:.1f}M parameters, 2 ranks, ZeRO stage 3, bf16, "
          f"{first['buckets']} buckets of up to {args.bucket} elements; 16-bit shard "
          f"{first['shard'] / mib:.1f} MiB per rank; offload_param.buffer_count "
          f"{args.param_buffers}, sub_group_size {args.param_chunk}")
    print("| run | rank | training state held between steps (MiB) | of it, read buffers (MiB) "
          "| read buffers at once, at most (MiB each, at most) | optimizer step: resident "
          "set rise, most of steps 2-5 (MiB) | of it, counted by the store: chunk buffers + "
          "persistent rows (MiB; chunks) | step (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ranks in runs.items():
        for r, res in enumerate(ranks):
            print(f"| {name} | {r} | {res['held'] / mib:.1f} | {res['buffers'] / mib:.1f} "
                  f"| {res['peak']} ({res['cap'] / mib:.1f}) | {res['step_grown'] / mib:.2f} "
                  f"| {res['step_counted'] / mib:.2f}; {res['step_chunks']} "
                  f"| {res['step']:.3f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--chunk", type=int, default=1 << 22, help="sub_group_size (elements)")
    p.add_argument("--buffers", type=int, default=4, help="offload_optimizer.buffer_count")
    p.add_argument("--nvme-path", default=tempfile.gettempdir())
    p.add_argument("--params", action="store_true",
                   help="stage 3 on 2 ranks, parameters in memory vs offload_param nvme")
    p.add_argument("--bucket", type=int, default=1_000_000,
                   help="--params: stage3_prefetch_bucket_size and reduce_bucket_size")
    p.add_argument("--param-buffers", type=int, default=5, help="offload_param.buffer_count")
    p.add_argument("--param-chunk", type=int, default=1 << 18,
                   help="--params: sub_group_size, the elements per chunk the step writes")
    args = p.parse_args(argv)
    if args.params:
        return _params_table(args)
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    mem = _train(args, None)
    off = _train(args, args.nvme_path)
    assert off["losses"] == mem["losses"], "offloaded training must give the same losses"
    # in 1 MiB calls, the offload's (aio.block_size's default)
    wb, rb = _bandwidth(args.nvme_path, off["state"], 1 << 20, direct=False)
    wd, rd = _bandwidth(args.nvme_path, off["state"], 1 << 20, direct=True)
    half = off["moved"] / 2  # Adam reads and writes the whole state once per step
    limit, limit_direct = half / rb + half / wb, half / rd + half / wd
    gib = 2 ** 30
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print(f"{mem['numel'] / 1e6:.1f}M parameters, optimizer state {off['state'] / gib:.2f} GiB, "
          f"{off['chunks']} chunks of {args.chunk} elements, {args.buffers} buffers; "
          f"filesystem of {args.nvme_path}: buffered write {wb / gib:.2f} GiB/s, read "
          f"{rb / gib:.2f} GiB/s; O_DIRECT write {wd / gib:.2f} GiB/s, read {rd / gib:.2f} GiB/s")
    print("| run | step (s) | optimizer step (s) | state in memory (GiB) "
          "| state moved per step (GiB) | disk limit, buffered (s) | optimizer step / limit "
          "| disk limit, O_DIRECT (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| in memory | {mem['step']:.2f} | {mem['opt']:.2f} | {mem['held'] / gib:.2f} "
          f"| 0 | - | - | - |")
    print(f"| nvme offload | {off['step']:.2f} | {off['opt']:.2f} | {off['held'] / gib:.2f} "
          f"| {off['moved'] / gib:.2f} | {limit:.2f} | {off['opt'] / limit:.2f} "
          f"| {limit_direct:.2f} |")


if __name__ == "__main__":
    main()
