"""Per-rank model-state bytes of ZeRO stages 1-3, measured, against ZeRO's formulas.

    python benchmarks/bench_memory.py [--ranks 2 4]

Measured: the bytes of every tensor the runtime holds between steps (parameters, gradient
buffers, fp32 master weights, Adam moments; ``ZeroRuntime.state_bytes``), after two training
steps of bench_zero's 17M-parameter model in bf16, and for stage 3 the most gathered-bucket
elements alive at once during those steps. Predicted: the plan's own prediction (what the
dump's plan.txt shows) and the formulas of the ZeRO paper (Rajbhandari et al. 2020, fig. 1,
K = 12 for mixed-precision Adam): stage 1 4Ψ + 12Ψ/N, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N.
Stage 3 runs with stage3_param_persistence_threshold 0 (nothing kept whole) so the formula
applies as written.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_zero import Net, _batch, run_ranks  # noqa: E402

FORMULA = {1: lambda p, n: 4 * p + 12 * p / n, 2: lambda p, n: 2 * p + 14 * p / n,
           3: lambda p, n: 16 * p / n}


def _measure(rank, world, stage):
    import zerofx

    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model = Net()
    cfg = {"bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 2_000_000,
                                 "stage3_prefetch_bucket_size": 2_000_000,
                                 "stage3_param_persistence_threshold": 0}}
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    for i in range(2):
        with rt.shape_carriers():
            loss = compiled(*_batch(rank, i))
        loss.backward()
        rt.step()
    live = rt.gatherer.peak * 2 if rt.gatherer is not None else 0
    return rt.state_bytes(), sum(rt.plan.predicted_bytes().values()), live, rt.plan.numel


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4])
    args = p.parse_args(argv)
    print("| stage | ranks | measured (MiB) | plan's prediction (MiB) | ZeRO formula (MiB) "
          "| measured / formula | stage 3: peak gathered (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.ranks:
        for stage in (1, 2, 3):
            print(f"running stage {stage} on {n} ranks ...", file=sys.stderr, flush=True)
            res = run_ranks(_measure, n, args=(stage,), timeout_s=600, fresh=True)
            measured = max(r[0] for r in res)
            predicted = max(r[1] for r in res)
            live = max(r[2] for r in res)
            formula = FORMULA[stage](res[0][3], n)
            mib = 2**20
            gathered = f"{live / mib:.1f}" if stage == 3 else ""
            print(f"| {stage} | {n} | {measured / mib:.1f} | {predicted / mib:.1f} | "
                  f"{formula / mib:.1f} | {measured / formula:.3f} | {gathered} |")


if __name__ == "__main__":
    main()
