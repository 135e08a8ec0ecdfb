"""What graph breaks cost: zerofx ZeRO-2 step time with 0, 1 and 4 breaks, next to DDP.

    python benchmarks/bench_graph_breaks.py [--ranks 2] [--steps 12]

The model of bench_zero.py (8 residual MLP blocks, ~17M parameters, micro-batch 16, bf16,
AdamW, clipping 1.0) with ``torch._dynamo.graph_break()`` after evenly spaced blocks. zerofx
runs through zerofx.initialize (engine.backward / engine.step); DDP runs with autocast and
torch's fused AdamW, the same model with and without breaks (eager: a break costs it
nothing). All in fresh processes, one after the other, in one invocation.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from bench_zero import BLOCKS, Block, _batch, _time_steps, run_table, time_ddp


class BrokenNet(nn.Module):
    """bench_zero's Net with a graph break after every ``BLOCKS // (breaks + 1)`` blocks."""

    def __init__(self, breaks: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        every = BLOCKS // (breaks + 1)
        self.break_after = {i for i in range(BLOCKS - 1) if (i + 1) % every == 0}
        self.break_after = set(sorted(self.break_after)[:breaks])

    def forward(self, x, y):
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in self.break_after:
                torch._dynamo.graph_break()
        return nn.functional.mse_loss(x.float(), y)


def run_zerofx(rank, world, steps, breaks):
    import zerofx

    torch.manual_seed(0)
    model = BrokenNet(breaks)
    cfg = {"train_micro_batch_size_per_gpu": 16, "bf16": {"enabled": True},
           "gradient_clipping": 1.0, "steps_per_print": 10**6,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 2_000_000}}
    engine, *_ = zerofx.initialize(model=model, config=cfg)

    def step(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss

    return _time_steps(step, rank, steps, engine.runtime.state_bytes, batch=_batch)


def run_ddp(rank, world, steps, breaks):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    return time_ddp(DDP(BrokenNet(breaks)), rank, steps)


def _rank_entry(rank, world, name, steps):
    torch.distributed.init_process_group("gloo")
    kind, breaks = name.rsplit("-", 1)
    runner = run_zerofx if kind == "zerofx" else run_ddp
    return runner(rank, world, steps, int(breaks.removesuffix("breaks")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)
    names = ["zerofx-0breaks", "zerofx-1breaks", "zerofx-4breaks", "ddp-0breaks"]
    run_table(_rank_entry, names, ranks=args.ranks, extra_args=(args.steps,),
              setup=f"bench_zero's 17M MLP with graph breaks, {args.ranks} ranks (gloo), "
                    f"micro-batch 16, bf16, ZeRO-2 (DDP: autocast + fused AdamW), clip 1.0, "
                    f"{args.steps} timed steps", label="run")


if __name__ == "__main__":
    main()
