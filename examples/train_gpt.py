"""Train a small character-level GPT on Shakespeare's sonnets with zerofx (the main job).

    zerofx-launch --num_gpus 2 examples/train_gpt.py --deepspeed_config examples/ds_config.json
    zerofx-launch --num_gpus 2 examples/train_gpt.py --deepspeed_config examples/ds_config.json \
        --resume --steps 450        # continues the curve from the saved checkpoint

bf16, ZeRO-2, Adam with warmup and clipping, from the DeepSpeed JSON config. The text ships
in examples/data (public domain); nothing is downloaded.
"""
import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import zerofx

DATA = Path(__file__).resolve().parent / "data" / "sonnets.txt"


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape  # (batch, time, channels)
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, block=64, d=128, heads=4, layers=2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.lnf(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class Windows(torch.utils.data.Dataset):
    """Every block-long window of the text, with the next-character targets."""

    def __init__(self, ids, block):
        self.ids, self.block = ids, block

    def __len__(self):
        return len(self.ids) - self.block - 1

    def __getitem__(self, i):
        return self.ids[i:i + self.block], self.ids[i + 1:i + 1 + self.block]


@torch.no_grad()
def sample(engine, stoi, itos, prompt="Shall I ", n=200, block=64):
    """Generate through the engine, on every rank: tensor-parallel ranks compute each token
    together. A fixed window of ``block`` tokens (newlines in front while the text is short)
    keeps one compiled inference graph instead of one per length."""
    idx, pad = [stoi[c] for c in prompt], stoi.get("\n", 0)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):  # no_grad: the decorator
        window = torch.tensor([([pad] * block + idx)[-block:]])
        logits = engine(window)[:, -1].float()
        idx.append(int(torch.multinomial(F.softmax(logits / 0.8, dim=-1), 1, generator=g)))
    return "".join(itos[i] for i in idx)


def batches(loader):
    while True:  # each pass over the loader is a new, reshuffled epoch
        yield from loader


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="train until this optimizer step")
    p.add_argument("--save_dir", default="checkpoints/gpt")
    p.add_argument("--resume", action="store_true", help="continue from save_dir's latest")
    p.add_argument("--sample_chars", type=int, default=200)
    zerofx.add_config_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    text = DATA.read_text()
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    torch.manual_seed(1337)
    model = GPT(len(chars))
    engine, _, loader, _ = zerofx.initialize(args=args, model=model,
                                             training_data=Windows(ids, 64))
    rank = int(os.environ.get("RANK", 0))
    if args.resume:
        path, state = engine.load_checkpoint(args.save_dir)
        if path is None:
            print(f"no checkpoint in {args.save_dir}: starting from scratch", file=sys.stderr)
        elif rank == 0:
            print(f"resumed from {path} at step {engine.global_steps}", flush=True)
    data, t0, tokens, losses = batches(loader), time.perf_counter(), 0, []
    while engine.global_steps < args.steps:
        x, y = next(data)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        tokens += x.numel()
        losses.append(loss.item())
        if rank == 0 and engine.global_steps % 10 == 0:
            rate = tokens / (time.perf_counter() - t0)
            bar = "#" * int(30 * engine.global_steps / args.steps)
            print(f"[{bar:<30}] step {engine.global_steps}/{args.steps} "
                  f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f} {rate:.0f} tok/s",
                  flush=True)
    engine.save_checkpoint(args.save_dir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state_mib = engine.runtime.state_bytes() / 2**20
    print(f"rank {rank}: peak RSS {peak:.0f} MiB, training state {state_mib:.1f} MiB, "
          f"{tokens / (time.perf_counter() - t0):.0f} tokens/s", flush=True)
    text = sample(engine, stoi, itos, n=args.sample_chars)
    if rank == 0:
        first = losses[0] if losses else math.nan
        print(f"loss {first:.3f} -> {losses[-1] if losses else math.nan:.3f}; "
              f"checkpoint in {args.save_dir}")
        print("--- sample ---\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
