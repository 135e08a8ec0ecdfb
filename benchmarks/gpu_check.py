"""The CUDA kernels against the plain-torch reference, and their bandwidth against a copy.

    python benchmarks/gpu_check.py                 # on a CUDA machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu    # the same checks of the C++ kernels, here
    python benchmarks/gpu_check.py --offload [--device cpu]   # ZeRO-Offload vs in memory

For each fused op (Adam, AdamW, LAMB's two passes), gradient dtype (fp32, bf16, fp16),
weight-copy dtype and the skip flag, the zerofx op runs on the device and its plain-torch
transcription (runtime/optim_ops.py, the CPU reference the CPU kernels are tested against)
on the CPU, over several steps of an odd-sized shard; every output must agree within fp32
rounding. Then the fused Adam step's bandwidth is timed against a device copy of the same
bytes. Exits non-zero on any mismatch. Prints a markdown table for benchmarks/RESULTS.md.

``--offload``: the main job's GPT (examples/train_gpt.py, its ds_config.json: ZeRO-2 on one
rank, bf16, Adam, clipping) trains ``--offload_steps`` steps in memory and with
``offload_optimizer: {device: cpu}`` (runtime/offload/host.py: fp32 state in pinned host
memory, the step on the CPU kernels), same weights and batches: same bits or not, the worst
difference, tokens/s and peak device memory side by side. With ``--device cpu`` the host
path is forced on CPU parameters (ZEROFX_FORCE_HOST_OFFLOAD), which must give the same bits;
on a GPU the host's C++ kernel replaces the CUDA one, so differences within the kernels'
tolerance pass (and are shown).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from zerofx.runtime import fused_optim, optim_ops
from zerofx.runtime.fused_optim import AdamHyper, LambHyper, adam_kwargs, lamb_kwargs

N = 1_000_003  # default shard size; odd: the tails of every vector and block loop run
STEPS = 4
TOL = 1e-5  # fp32 state: a few units of the last place after STEPS steps


def _t(x, device):
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def _adam_case(device, n, grad_dtype, out_dtype, adam_w_mode, skip) -> float:
    """Largest difference of every Adam output after STEPS steps, in tolerances (fp32 state:
    TOL; a bf16/fp16 weight copy: one unit of its last place, since a last-bit difference
    in the fp32 weight may round it the other way)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen).to(grad_dtype) for _ in range(STEPS)]
    hyper = AdamHyper(weight_decay=0.01, adam_w_mode=adam_w_mode)
    runs = {}
    for where, op in (("ref", optim_ops.adam_step_fallback),
                      ("dev", torch.ops.zerofx.adam_step_)):
        dev = "cpu" if where == "ref" else device
        state = [p.clone().to(dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
        out = torch.zeros(n, dtype=out_dtype, device=dev) if out_dtype else None
        for step, g in enumerate(grads, start=1):
            op(*state[:1], g.to(dev), *state[1:], out, _t(1e-3, dev), _t(step, dev),
               _t(0.5, dev), _t(skip, dev), **adam_kwargs(hyper))
        runs[where] = [*state, *([out] if out is not None else [])]
    return max(_rel(a, b) / _tol(a) for a, b in zip(runs["ref"], runs["dev"]))


def _lamb_case(device, n, grad_dtype, skip) -> float:
    bounds = torch.tensor([0, 1000, 1077, n], dtype=torch.int64)  # three tensors
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen).to(grad_dtype) for _ in range(STEPS)]
    hyper = LambHyper(weight_decay=0.01)
    runs = {}
    for where in ("ref", "dev"):
        dev = "cpu" if where == "ref" else device
        moments = optim_ops.lamb_moments_fallback if where == "ref" else \
            torch.ops.zerofx.lamb_moments_
        apply = optim_ops.lamb_apply_fallback if where == "ref" else torch.ops.zerofx.lamb_apply_
        w, m, v = p.clone().to(dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
        b = bounds.to(dev)
        for step, g in enumerate(grads, start=1):
            sums = moments(w, g.to(dev), m, v, b, _t(1.0, dev), _t(skip, dev), shard_offset=0,
                           **lamb_kwargs(hyper, apply=False))
            ratio = fused_optim.lamb_trust_ratio(sums, hyper=hyper)
            apply(w, m, v, None, b, ratio, _t(1e-3, dev), _t(step, dev), _t(skip, dev),
                  shard_offset=0, **lamb_kwargs(hyper, apply=True))
        runs[where] = [w, m, v]
    return max(_rel(a, b) / _tol(a) for a, b in zip(runs["ref"], runs["dev"]))


def _tol(ref: torch.Tensor) -> float:
    return TOL if ref.dtype == torch.float32 else torch.finfo(ref.dtype).eps


def _rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Largest |got - ref| / max(|ref|, 1e-3) (inf where got is not finite but ref is)."""
    ref, got = ref.float().cpu(), got.float().cpu()
    if not torch.equal(torch.isfinite(got), torch.isfinite(ref)):
        return float("inf")
    fin = torch.isfinite(ref)
    return float(((got[fin] - ref[fin]).abs() / ref[fin].abs().clamp(min=1e-3)).max())


def _bandwidth(device, n: int) -> tuple[float, float]:
    """GB/s of one fused Adam step (fp32 weights, moments; bf16 gradient and weight copy)
    and of a device copy, each counted as the bytes it must read and write."""
    p, m, v = (torch.zeros(n, device=device) for _ in range(3))
    g = torch.zeros(n, dtype=torch.bfloat16, device=device)
    out = torch.zeros(n, dtype=torch.bfloat16, device=device)
    src, dst = torch.zeros(n, device=device), torch.empty(n, device=device)
    scalars = [_t(x, device) for x in (1e-3, 1, 1.0, 0.0)]

    def adam():
        torch.ops.zerofx.adam_step_(p, g, m, v, out, *scalars, **adam_kwargs(AdamHyper()))

    adam_bytes = n * (3 * 8 + 2 + 2)  # p, m, v read + written; g read; out written
    return (adam_bytes / _seconds(adam, device) / 1e9,
            2 * 4 * n / _seconds(lambda: dst.copy_(src), device) / 1e9)


def _seconds(fn, device, reps: int = 20) -> float:
    fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def _offload_run(train, job, ids, vocab, device, config, steps, warmup):
    """(losses, parameters, seconds of the timed steps, peak device MiB, device-side
    training-state MiB, host-side offloaded MiB) of one training run."""
    from zerofx.runtime.train_state import nbytes

    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = train._zerofx(job, vocab, device, config)  # the GPU training check's engine
    engine = step.engine
    losses, seconds = train._run(step, train._batches(ids, job.BLOCK, steps), device, warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" \
        else float("nan")
    st = engine.runtime.state
    dev_mib = nbytes(st.flat_params, st.master, st.exp_avg, st.exp_avg_sq, st.shard_lowp,
                     st.shard_grads, st.full_grads) / 2**20
    host_mib = st.offload.memory_bytes() / 2**20 if st.offload is not None else 0.0
    params = [p.detach().float().cpu().clone() for p in engine.module.parameters()]
    engine.runtime.close()
    return losses, params, seconds, peak, dev_mib, host_mib


def offload_check(device_name: str, steps: int, warmup: int) -> int:
    """In memory vs offload_optimizer cpu on the main job's GPT (see the module doc)."""
    import importlib.util
    import os

    bench = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("gpu_train", bench / "gpu_train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    device = torch.device(device_name)
    forced = os.environ.get("ZEROFX_FORCE_HOST_OFFLOAD")
    if device.type == "cpu":  # the GPU path on CPU parameters, every copy real
        os.environ["ZEROFX_FORCE_HOST_OFFLOAD"] = "1"
    try:
        return _offload_compare(train, device, steps, warmup)
    finally:
        if forced is None:
            os.environ.pop("ZEROFX_FORCE_HOST_OFFLOAD", None)
        else:
            os.environ["ZEROFX_FORCE_HOST_OFFLOAD"] = forced


def _offload_compare(train, device, steps: int, warmup: int) -> int:
    import json

    bench = Path(__file__).resolve().parent
    job = train._main_job()
    text = job.DATA.read_text()
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    base = json.loads((bench.parent / "examples" / "ds_config.json").read_text())
    base["steps_per_print"] = 10**9
    runs = {}
    for name, off in (("in memory", None), ("offload_optimizer cpu", {"device": "cpu",
                                                                      "pin_memory": True})):
        config = json.loads(json.dumps(base))
        if off is not None:
            config["zero_optimization"]["offload_optimizer"] = off
        runs[name] = _offload_run(train, job, ids, len(stoi), device, config, steps, warmup)
    (l0, p0, *_), (l1, p1, *_) = runs.values()
    same = l0 == l1 and all(torch.equal(a, b) for a, b in zip(p0, p1))
    worst = max(_rel(a, b) for a, b in zip(p0, p1))
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        "CPU (host path forced)"
    tokens = (steps - warmup) * train.BATCH * job.BLOCK
    print(f"\n{label}, torch {torch.__version__}, main job's GPT, ZeRO-2 on one rank, bf16, "
          f"{steps} steps ({warmup} untimed)\n")
    print("| optimizer state | tokens/s | last loss | peak device MiB | device state MiB | "
          "host state MiB |")
    print("|---|---|---|---|---|---|")
    for name, (losses, _, secs, peak, dev_mib, host_mib) in runs.items():
        print(f"| {name} | {tokens / secs:.0f} | {losses[-1]:.4f} | {peak:.1f} | "
              f"{dev_mib:.1f} | {host_mib:.1f} |")
    print(f"\nsame bits (losses and parameters): {'yes' if same else 'NO'}; worst parameter "
          f"difference {worst:.2e} (relative)")
    if device.type == "cpu" and not same:
        return 1  # the same kernels on the same values: anything else is a defect
    return 0 if worst <= torch.finfo(torch.bfloat16).eps else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--numel", type=int, default=N, help="shard size of the checks (> 1077)")
    p.add_argument("--bandwidth_numel", type=int, default=64 << 20)
    p.add_argument("--offload", action="store_true",
                   help="instead: ZeRO-Offload (offload_optimizer cpu) vs in-memory training")
    p.add_argument("--offload_steps", type=int, default=30)
    p.add_argument("--offload_warmup", type=int, default=5)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu to check the C++ kernels", file=sys.stderr)
        return 2
    if args.offload:
        return offload_check(args.device, args.offload_steps, args.offload_warmup)
    if not fused_optim.load_kernels():
        print("the kernels could not be built (see the warning above)", file=sys.stderr)
        return 1
    key = "CUDA" if args.device == "cuda" else "CPU"
    for op in ("adam_step_", "lamb_moments_", "lamb_apply_"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"zerofx::{op}", key):
            print(f"zerofx::{op} has no {key} kernel: the fallback would be tested",
                  file=sys.stderr)
            return 1
    rows, failed = [], False
    for gd in (torch.float32, torch.bfloat16, torch.float16):
        for od in (None, torch.bfloat16, torch.float16):
            for w_mode in (True, False):
                for skip in (0.0, 1.0):
                    rel = _adam_case(args.device, args.numel, gd, od, w_mode, skip)
                    rows.append((f"{'AdamW' if w_mode else 'Adam'}", gd, od, skip, rel))
        for skip in (0.0, 1.0):
            rows.append(("LAMB", gd, None, skip, _lamb_case(args.device, args.numel, gd, skip)))
    print(f"\n{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, {args.numel} elements, {STEPS} steps\n")
    print("| optimizer | grad dtype | weight copy | skip | worst difference / tolerance | ok |")
    print("|---|---|---|---|---|---|")
    for name, gd, od, skip, worst in rows:
        ok = worst <= 1.0
        failed |= not ok
        print(f"| {name} | {str(gd)[6:]} | {str(od)[6:] if od else '-'} | {int(skip)} | "
              f"{worst:.3f} | {'yes' if ok else 'NO'} |")
    adam_gbs, copy_gbs = _bandwidth(args.device, args.bandwidth_numel)
    print(f"\nfused Adam step {adam_gbs:.0f} GB/s, copy {copy_gbs:.0f} GB/s "
          f"({args.bandwidth_numel} elements; {adam_gbs / copy_gbs:.0%} of a copy)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
