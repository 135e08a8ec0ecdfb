"""Bandwidth of zerofx's fused optimizer kernels next to a plain copy and torch's optimizers.

    python benchmarks/bench_fused_optim.py [--blocks 3] [--repeats 15] [--threads N]

One flat fp32 shard shaped like `--blocks` GPT-2-small transformer blocks (7.08M elements and
12 tensors each; 3 blocks = 21M elements). Each kernel is charged the bytes it must read and
write once (state, gradient, master weight, bf16 copy) and its bandwidth is that over its
median time. Cases run round-robin, one call each per round, so a load change on a shared
machine hits every case alike. Peers:

- copy:                    dst.copy_(src) on fp32 buffers of the shard's size (8 B/element)
- in-place add:            dst.add_(src) (12 B/element), a yardstick without write-allocate
- torch Adam fused/foreach: torch.optim.Adam(fused=True / foreach=True) on the flat tensor
- foreach LAMB:            DeepSpeed's FusedLamb math as torch._foreach_* ops over the tensors
"""
import argparse
import platform
import statistics
import time

import torch

from zerofx.runtime import fused_optim
from zerofx.runtime.fused_optim import AdamHyper, LambHyper

# One GPT-2-small block (d=768): qkv, attn proj, two layer norms, mlp in/out (weights, biases).
BLOCK = [768 * 2304, 2304, 768 * 768, 768, 768, 768, 768 * 3072, 3072, 3072 * 768, 768, 768,
         768]
LAMB = LambHyper(weight_decay=0.01)


def _state(n, grad_dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, generator=gen), torch.randn(n, generator=gen).to(grad_dtype),
            torch.zeros(n), torch.zeros(n))


def _case_copy(n):
    src, dst = torch.randn(n), torch.empty(n)
    return lambda: dst.copy_(src), 8


def _case_add(n):
    # Like the optimizers, it writes only what it has read: no write-allocate traffic beyond
    # the counted bytes, which a copy's destination costs (12 B really moved per 8 counted).
    src, dst = torch.randn(n), torch.zeros(n)
    return lambda: dst.add_(src), 12


def _case_adam(n, grad_dtype, out_dtype):
    p, g, m, v = _state(n, grad_dtype)
    out = torch.empty(n, dtype=out_dtype) if out_dtype else None
    scalars = [torch.tensor(1e-3), torch.tensor(0.0), torch.tensor(1 / 1024), torch.tensor(0.0)]
    kw = fused_optim.adam_kwargs(AdamHyper(weight_decay=0.01))

    def run():
        scalars[1] += 1  # step
        torch.ops.zerofx.adam_step_(p, g, m, v, out, scalars[0], scalars[1], scalars[2],
                                    scalars[3], **kw)

    grad_bytes, out_bytes = g.element_size(), out.element_size() if out is not None else 0
    return run, 24 + grad_bytes + out_bytes  # p, m, v read and written; g read; copy written


def _case_torch_adam(n, **opt_kw):
    p, g, _, _ = _state(n)
    p.grad = g
    opt = torch.optim.Adam([p], lr=1e-3, weight_decay=0.01, **opt_kw)
    return opt.step, 28


def _case_lamb(n, sizes, grad_dtype, out_dtype):
    p, g, m, v = _state(n, grad_dtype)
    out = torch.empty(n, dtype=out_dtype) if out_dtype else None
    bounds = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    step = torch.tensor(0.0)

    def run():
        step.add_(1)
        fused_optim.lamb_step_(p, g, m, v, bounds, lr=1e-3, step=step, hyper=LAMB, param_out=out)

    # pass 1: p, g, m, v read, m, v written; pass 2: p, m, v read, p (and the copy) written
    return run, 16 + g.element_size() + 20 + (out.element_size() if out is not None else 0)


def _case_foreach_lamb(n, sizes):
    p, g, m, v = _state(n)
    ps, gs, ms, vs = (list(t.split(sizes)) for t in (p, g, m, v))
    (beta1, beta2), state = LAMB.betas, {"step": 0}

    def run():
        state["step"] += 1
        t = state["step"]
        step_size = 1e-3 * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        grads = torch._foreach_mul(gs, 1 / 1024)
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        update = torch._foreach_sqrt(vs)
        torch._foreach_add_(update, LAMB.eps)
        torch._foreach_div_(update, ms)
        torch._foreach_reciprocal_(update)  # m / (sqrt(v) + eps), reusing one buffer
        torch._foreach_add_(update, ps, alpha=LAMB.weight_decay)
        sums = torch.stack([torch.stack(torch._foreach_norm(ps)),
                            torch.stack(torch._foreach_norm(update))]).square()
        ratio = fused_optim.lamb_trust_ratio(sums, hyper=LAMB)
        torch._foreach_mul_(update, (ratio * -step_size).tolist())
        torch._foreach_add_(ps, update)

    return run, 40


def _cases(n, sizes):
    bf16 = torch.bfloat16
    return {
        "copy (peer)": _case_copy(n),
        "in-place add (peer)": _case_add(n),
        "zerofx adam_step_ fp32 grad": _case_adam(n, torch.float32, None),
        "zerofx adam_step_ bf16 grad + bf16 copy": _case_adam(n, bf16, bf16),
        "torch Adam fused=True (peer)": _case_torch_adam(n, fused=True),
        "torch Adam foreach=True (peer)": _case_torch_adam(n, foreach=True),
        "zerofx LAMB (2 passes) fp32 grad": _case_lamb(n, sizes, torch.float32, None),
        "zerofx LAMB (2 passes) bf16 grad + bf16 copy": _case_lamb(n, sizes, bf16, bf16),
        "foreach LAMB fp32 (peer)": _case_foreach_lamb(n, sizes),
    }


def _measure(cases, repeats):
    for run, _ in cases.values():  # warm-up: first-touch page faults, lazy init
        run()
        run()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (run, _) in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3, help="GPT-2 blocks in the shard")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert fused_optim.load_kernels(), "the C++ kernels did not build: nothing to measure"
    sizes = BLOCK * args.blocks
    n = sum(sizes)
    cases = _cases(n, sizes)
    times = _measure(cases, args.repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    copy_bw = n * 8 / med["copy (peer)"]
    add_bw = n * 12 / med["in-place add (peer)"]
    print(f"machine: {_cpu_name()}, {args.threads} threads, "
          f"torch {torch.__version__}, {n / 1e6:.2f}M elements, {len(sizes)} tensors, "
          f"median of {args.repeats}")
    print("| case | ms (median) | ms (best) | bytes/elem | GB/s (median) | % of copy | "
          "% of add |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (_, bytes_per) in cases.items():
        bw = n * bytes_per / med[name]
        print(f"| {name} | {med[name] * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | {bytes_per} | "
              f"{bw / 1e9:.1f} | {100 * bw / copy_bw:.0f}% | {100 * bw / add_bw:.0f}% |")
    print("\nspeed-up = peer time / zerofx time, the median over rounds of each round's ratio "
          "(robust to load drift on a shared machine):")
    for ours, peer in [("zerofx adam_step_ fp32 grad", "torch Adam fused=True (peer)"),
                       ("zerofx adam_step_ fp32 grad", "torch Adam foreach=True (peer)"),
                       ("zerofx LAMB (2 passes) fp32 grad", "foreach LAMB fp32 (peer)")]:
        ratio = statistics.median(b / a for a, b in zip(times[ours], times[peer]))
        print(f"- {ours} vs {peer}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
