"""ZeRO-2 step time and per-rank peak memory: zerofx vs torch DDP (+autocast) vs FSDP2.

    python benchmarks/bench_zero.py [--ranks 2] [--steps 12] [--bucket 2000000]

Model (issue 4): 8 residual blocks of Linear(512, 2048) -> GELU -> Linear(2048, 512), about
17M parameters, micro-batch 16, bf16 compute, Adam(W), gradient clipping 1.0. Every framework
runs in fresh processes (gloo on this CPU), one after the other in the same invocation; the
table goes to stdout (markdown) for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from multiproc import run_ranks  # noqa: E402  (the tests' N-process runner)

D, H, BLOCKS, MICRO = 512, 2048, 8, 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))

    def forward(self, x, y):
        for b in self.blocks:
            x = b(x)
        return nn.functional.mse_loss(x.float(), y)


# --model sequential: the same blocks as users write them most often, an nn.Sequential with
# the loss taken outside the model on its .float() output (the rank processes are fresh, so
# the choice travels in the environment).
MODEL_ENV = "BENCH_ZERO_MODEL"


def _sequential() -> bool:
    return os.environ.get(MODEL_ENV) == "sequential"


def make_net() -> nn.Module:
    return nn.Sequential(*(Block() for _ in range(BLOCKS))) if _sequential() else Net()


def loss_of(model, x, y):
    """The loss as the benchmark's user computes it: inside Net, outside the Sequential."""
    if _sequential():
        return nn.functional.mse_loss(model(x).float(), y)
    return model(x, y)


def blocks_of(model: nn.Module):
    return list(model) if _sequential() else list(model.blocks)


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(MICRO, D, generator=g), torch.randn(MICRO, D, generator=g)


def _tensor_bytes(tensors) -> int:
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in local}.values())


def _torch_state_bytes(model, opt) -> int:
    """Parameters, gradients and optimizer state this rank holds (local shards for FSDP2)."""
    params = list(model.parameters())
    states = [v for st in opt.state.values() for v in st.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0]
    return _tensor_bytes(params + [p.grad for p in params] + states)


def _time_steps(step_fn, rank, steps, state_bytes, warmup=3, batch=None):
    times = []
    for i in range(warmup + steps):
        x, y = (batch or _batch)(rank, i)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        loss = step_fn(x, y)
        times.append(time.perf_counter() - t0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return statistics.median(times[warmup:]), peak_mib, float(loss), state_bytes() / 2**20


def run_zerofx(rank, world, steps, bucket, disable=(), stage=2, forms=None, bf16=True):
    import zerofx

    torch.manual_seed(0)
    model = make_net()
    cfg = {"bf16": {"enabled": bf16}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket,
                                 "stage3_prefetch_bucket_size": bucket},
           "zerofx": {"disable_passes": list(disable), **(forms or {})}}
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})

    phases = {"forward": [], "backward": [], "optimizer step": [], "exposed bucket wait": []}

    def step(x, y):
        t0 = time.perf_counter()
        with rt.shape_carriers():  # stage 3: the partitioned weights' stand-ins
            loss = loss_of(compiled, x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        waited = rt.comm_wait_s
        rt.step()
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, rt.comm_wait_s - waited)):
            phases[k].append(v)
        return loss

    result = _time_steps(step, rank, steps, rt.state_bytes)
    # where the time goes: medians of the timed steps (the optimizer step includes the
    # bucket wait, i.e. the gradient communication backward did not hide)
    return (*result, {k: statistics.median(v[-steps:]) for k, v in phases.items()})


def run_ddp(rank, world, steps, bucket):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    return time_ddp(DDP(make_net()), rank, steps)


def run_ddp_fp32(rank, world, steps, bucket):
    """DDP without autocast: on a host without native bf16 GEMMs (AVX2 only) fp32 is its
    strongest setting."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    return time_ddp(DDP(make_net()), rank, steps, autocast=False)


def time_ddp(model, rank, steps, autocast=True):
    """DDP at its strongest here: autocast bf16 (or fp32, see run_ddp_fp32) and torch's fused
    AdamW, clipping 1.0."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep grads allocated, as between steps
        return loss

    return _time_steps(step, rank, steps, lambda: _torch_state_bytes(model, opt))


def run_fsdp2_fp32(rank, world, steps, bucket):
    """FSDP2 without a mixed-precision policy: its strongest setting on a host without
    native bf16 GEMMs (AVX2 only)."""
    return run_fsdp2(rank, world, steps, bucket, param_dtype=None)


def run_fsdp2(rank, world, steps, bucket, param_dtype=torch.bfloat16):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = make_net()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype)
    for b in blocks_of(model):
        fully_shard(b, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y):
        loss = loss_of(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    return _time_steps(step, rank, steps, lambda: _torch_state_bytes(model, opt))


def run_zerofx_fp32(rank, world, steps, bucket):
    """zerofx without mixed precision: on a host without native bf16 GEMMs (AVX2 only) the
    fp32 step is the like-for-like peer of ddp-fp32."""
    return run_zerofx(rank, world, steps, bucket, bf16=False)


def run_zerofx_untuned(rank, world, steps, bucket):
    """Ablation: zerofx without its matmul_form pass (bf16 GEMMs as traced)."""
    return run_zerofx(rank, world, steps, bucket, disable=("matmul_form",))


def run_zerofx_stage3(rank, world, steps, bucket):
    """Stage 3: parameters gathered by the graphs (persistence threshold 1e5, DeepSpeed's)."""
    return run_zerofx(rank, world, steps, bucket, stage=3)


def run_zerofx_collective_forms(rank, world, steps, bucket):
    """Ablation: gloo's all-reduce (+ slice) and all-gather, as zerofx moved buckets and
    shards before it timed the point-to-point forms (runtime/comm/forms.py)."""
    return run_zerofx(rank, world, steps, bucket,
                      forms={"reduce_form": "all_reduce", "gather_form": "all_gather"})


def run_zerofx_p2p(rank, world, steps, bucket):
    """Ablation: the point-to-point forms pinned (gloo over loopback TCP), as zerofx chose
    on one host before the shared-memory forms (runtime/comm/shm.py)."""
    return run_zerofx(rank, world, steps, bucket,
                      forms={"reduce_form": "p2p", "gather_form": "p2p"})


RUNNERS = {"zerofx": run_zerofx, "zerofx-p2p": run_zerofx_p2p, "zerofx-fp32": run_zerofx_fp32, "zerofx-untuned": run_zerofx_untuned,
           "zerofx-allreduce-allgather": run_zerofx_collective_forms,
           "zerofx-stage3": run_zerofx_stage3, "ddp": run_ddp, "ddp-fp32": run_ddp_fp32,
           "fsdp2": run_fsdp2, "fsdp2-fp32": run_fsdp2_fp32}


def _rank_entry(rank, world, name, steps, bucket):
    torch.distributed.init_process_group("gloo")
    return RUNNERS[name](rank, world, steps, bucket)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--bucket", type=int, default=2_000_000, help="zerofx reduce_bucket_size")
    p.add_argument("--only", nargs="*", default=["zerofx", "ddp", "fsdp2"],
                   choices=sorted(RUNNERS))
    p.add_argument("--model", choices=("net", "sequential"), default="net",
                   help="sequential: nn.Sequential of the blocks, the loss outside the model")
    args = p.parse_args(argv)
    os.environ[MODEL_ENV] = args.model
    params = sum(q.numel() for q in Net().parameters())
    run_table(_rank_entry, args.only, ranks=args.ranks, extra_args=(args.steps, args.bucket),
              setup=f"{args.model} model, {params / 1e6:.1f}M params, {args.ranks} ranks (gloo), micro-batch "
                    f"{MICRO}, bf16, clip 1.0, {args.steps} timed steps")


def run_table(entry, names, *, ranks: int, extra_args: tuple, setup: str,
              label: str = "framework") -> None:
    """Run each of ``names`` on ``ranks`` fresh processes, one after the other, and print the
    markdown table: the slowest rank's median step, the largest state and RSS, rank 0's loss."""
    rows = []
    for name in names:
        print(f"running {name} on {ranks} ranks ...", file=sys.stderr, flush=True)
        res = run_ranks(entry, ranks, args=(name, *extra_args), timeout_s=900, fresh=True)
        rows.append((name, max(r[0] for r in res) * 1e3, max(r[3] for r in res),
                     max(r[1] for r in res), res[0][2], res[0][4] if len(res[0]) > 4 else None))
    print(f"\n{setup}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}\n")
    print(f"| {label} | median step (ms) | training state per rank (MiB) "
          "| peak RSS per rank (MiB) | last loss |")
    print("|---|---|---|---|---|")
    for name, ms, state, rss, loss, _ in rows:
        print(f"| {name} | {ms:.1f} | {state:.0f} | {rss:.0f} | {loss:.4f} |")
    split = [(name, ph) for name, *_, ph in rows if ph]
    if split:
        names = list(split[0][1])
        print(f"\nwhere the time goes (rank 0, median ms)\n\n| {label} | "
              + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for name, ph in split:
            print(f"| {name} | " + " | ".join(f"{ph[k] * 1e3:.1f}" for k in names) + " |")


if __name__ == "__main__":
    main()
