"""Quickstart: train a small transformer block with torch.compile(backend="zero").

    python examples/quickstart.py --steps 60 --dump zerofx_dump
    zerofx-dump zerofx_dump --kind joint --diff mixed_precision

Uses a plain torch optimizer; the engine (zerofx.initialize) builds on the same backend.
"""
import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyLM(nn.Module):
    """A one-block causal language model over bytes."""

    def __init__(self, d=64, heads=4, vocab=256, block=32):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T))  # (B, T, d)
        q, k, v = self.qkv(self.ln1(x)).split(x.size(-1), dim=2)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        logits = self.head(self.lnf(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def batches(text: bytes, *, batch=16, block=32, seed=0):
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        ix = torch.randint(len(data) - block - 1, (batch,), generator=g)
        yield (torch.stack([data[i:i + block] for i in ix]),
               torch.stack([data[i + 1:i + 1 + block] for i in ix]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--dump", default=None, help="write per-pass graph dumps here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    text = open(__file__, "rb").read() * 4  # no downloads: the script trains on itself
    model = TinyLM()
    config = {"bf16": {"enabled": True}, "zerofx": {"dump_dir": args.dump}}
    compiled = torch.compile(model, backend="zero", options={"config": config})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0, first = time.perf_counter(), None
    for step, (x, y) in zip(range(1, args.steps + 1), batches(text)):
        loss = compiled(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first if first is not None else loss.item()
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.1f} s)")
    print(f"loss {first:.3f} -> {loss.item():.3f} in {args.steps} steps (bf16, zero backend)")
    return 0 if loss.item() < first else 1


if __name__ == "__main__":
    sys.exit(main())
