"""Tensor-parallel training step: zerofx's graph-pass TP vs PyTorch's DTensor TP, 2 ranks.

    python benchmarks/bench_tp.py [--steps 12] [--only zerofx-tp dtensor-tp zerofx-dp]

Model: 4 pre-norm GPT blocks (d 512, 8 heads, separate q/k/v projections, MLP 512 → 2048 →
512), batch 8 × 64 tokens, bf16 compute, AdamW, clipping 1.0. Both TP runs split q, k, v and
fc1 by columns and proj and fc2 by rows over the 2 ranks (Megatron's layout), and both see
the same batch on both ranks. zerofx-dp (ZeRO-2 over 2 data-parallel ranks, each with its
own batch) is there for scale: it does the same work per rank on different data. Each runs in
fresh processes (gloo), one after the other in one invocation; a markdown table goes to
stdout for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from bench_zero import _time_steps, _torch_state_bytes, run_table  # noqa: E402

D, HEADS, BLOCKS, B, T = 512, 8, 4, 8, 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.proj = nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln1(x)
        # -1 heads: DTensor TP hands each rank its local columns, so its model code may not
        # name the head count (zerofx would take `HEADS` too: it fixes the shape itself).
        q, k, v = (m(h).view(b, t, -1, D // HEADS).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))

    def forward(self, x, y):
        for blk in self.blocks:
            x = blk(x)
        return F.mse_loss(x.float(), y)


TP_PLAN = {"blocks.*.q": "colwise", "blocks.*.k": "colwise", "blocks.*.v": "colwise",
           "blocks.*.proj": "rowwise", "blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise"}


def _batch_fn(same_on_all_ranks: bool):
    def batch(rank, step):
        g = torch.Generator().manual_seed(100 * step + (0 if same_on_all_ranks else rank))
        return torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    return batch


def run_zerofx(rank, world, steps, tp):
    import zerofx

    torch.manual_seed(0)
    model = Net()
    cfg = {"bf16": {"enabled": True}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 2_000_000}}
    if tp > 1:
        cfg["tensor_parallel"] = {"size": tp, "plan": TP_PLAN}
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})

    def step(x, y):
        with rt.shape_carriers():
            loss = compiled(x, y)
        loss.backward()
        rt.step()
        return loss

    return _time_steps(step, rank, steps, rt.state_bytes, batch=_batch_fn(tp > 1))


def run_dtensor(rank, world, steps, tp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    torch.manual_seed(0)
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    for blk in model.blocks:
        parallelize_module(blk, mesh, {"q": ColwiseParallel(), "k": ColwiseParallel(),
                                       "v": ColwiseParallel(), "proj": RowwiseParallel(),
                                       "fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        with implicit_replication():  # LayerNorm's plain-tensor grads count as replicated
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    return _time_steps(step, rank, steps, lambda: _torch_state_bytes(model, opt),
                       batch=_batch_fn(True))


RUNNERS = {"zerofx-tp": (run_zerofx, 2), "dtensor-tp": (run_dtensor, 2),
           "zerofx-dp": (run_zerofx, 1)}


def _rank_entry(rank, world, name, steps):
    torch.distributed.init_process_group("gloo")
    fn, tp = RUNNERS[name]
    return fn(rank, world, steps, tp)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--only", nargs="*", default=list(RUNNERS), choices=list(RUNNERS))
    args = p.parse_args(argv)
    params = sum(q.numel() for q in Net().parameters())
    run_table(_rank_entry, args.only, ranks=2, extra_args=(args.steps,), label="run",
              setup=f"{params / 1e6:.1f}M params, 2 ranks (gloo), batch {B}x{T}, bf16, "
                    f"clip 1.0, {args.steps} timed steps")


if __name__ == "__main__":
    main()
