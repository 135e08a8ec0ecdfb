"""Train a small character-level GPT on Shakespeare's sonnets with zerofx (the main job).

    zerofx-launch --num_gpus 2 examples/train_gpt.py --deepspeed_config examples/ds_config.json
    zerofx-launch --num_gpus 2 examples/train_gpt.py --deepspeed_config examples/ds_config.json \
        --resume --steps 450        # continues the curve from the saved checkpoint

bf16, ZeRO-2, Adam with warmup and clipping, from the DeepSpeed JSON config. The text ships
in examples/data (public domain); nothing is downloaded. The last 10% of the text is held
out: its loss (validation) shows when the model starts memorising the rest. Everything the
run writes goes under --out_dir (default examples/runs/<config name>, so the data-parallel
and tensor-parallel variants never overwrite each other): the checkpoint, curve.csv (train
and validation loss per step) and, with matplotlib installed (pip install -e ".[plot]"),
curve.png.
"""
import argparse
import contextlib
import csv
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import zerofx

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "sonnets.txt"
BLOCK = 64  # characters of context
WARMUP_STEPS = 5  # steps that include compilation: left out of the steady-state throughput


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
def sample(engine, stoi, itos, prompt="Shall I ", n=200, block=BLOCK):
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


@torch.no_grad()
class Throughput:
    """Tokens per second of training since ``start``, validation time left out."""

    def __init__(self):
        self.t0, self.tokens, self.excluded = None, 0, 0.0

    def start(self, tokens: int) -> None:
        self.t0, self.tokens, self.excluded = time.perf_counter(), tokens, 0.0

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began

    def __call__(self, tokens: int) -> float:
        if self.t0 is None or tokens <= self.tokens:
            return float("nan")
        return (tokens - self.tokens) / (time.perf_counter() - self.t0 - self.excluded)


def validation_loss(engine, val_ids, batches=8, batch=16):
    """Mean loss over fixed, evenly spread windows of the held-out text (the same on every
    rank, so data- and tensor-parallel ranks agree)."""
    starts = torch.linspace(0, len(val_ids) - BLOCK - 2, batches * batch).long()
    total = 0.0
    for chunk in starts.split(batch):
        x = torch.stack([val_ids[i:i + BLOCK] for i in chunk])
        y = torch.stack([val_ids[i + 1:i + 1 + BLOCK] for i in chunk])
        total += float(engine(x, y))
    return total / batches


class Curve:
    """curve.csv (step, train_loss, val_loss) on rank 0; a resumed run appends to it."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.rows = path, []
        if not (resume and path.exists()):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "train_loss", "val_loss"])

    def add(self, step, train, val=None):
        self.rows.append((step, f"{train:.4f}", "" if val is None else f"{val:.4f}"))

    def flush(self):
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows(self.rows)
        self.rows = []

    def plot(self) -> Path | None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows],
                label="train")
        val = [r for r in rows if r["val_loss"]]
        ax.plot([int(r["step"]) for r in val], [float(r["val_loss"]) for r in val], "o-",
                label="validation (held-out 10%)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy loss")
        ax.legend()
        out = self.path.with_suffix(".png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="train until this optimizer step")
    p.add_argument("--out_dir", help="where the checkpoint and the curve go (default: "
                                     "examples/runs/<config file name>)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's checkpoint")
    p.add_argument("--eval_every", type=int, default=50, help="validation loss every N steps")
    p.add_argument("--log_every", type=int, default=10, help="a progress line every N steps")
    p.add_argument("--sample_chars", type=int, default=200)
    zerofx.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.out_dir is None:
        name = Path(args.deepspeed_config).stem if args.deepspeed_config else "default"
        args.out_dir = str(HERE / "runs" / name)
    return args


def main(argv=None):
    args = parse_args(argv)
    text = DATA.read_text()
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    torch.manual_seed(1337)
    model = GPT(len(chars), block=BLOCK)
    engine, _, loader, _ = zerofx.initialize(args=args, model=model,
                                             training_data=Windows(train_ids, BLOCK))
    rank = int(os.environ.get("RANK", 0))
    out_dir, ckpt = Path(args.out_dir), Path(args.out_dir) / "checkpoint"
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = engine.runtime.plan.grid
    if rank == 0:
        print(f"{grid.world_size} ranks: tensor parallel {grid.tp_size} x data parallel "
              f"{grid.dp_size}; global batch {engine.train_batch_size()} windows of {BLOCK} "
              f"characters; writing to {out_dir}", flush=True)
    if args.resume:
        path, _ = engine.load_checkpoint(ckpt)
        if path is None:
            print(f"no checkpoint in {ckpt}: starting from scratch", file=sys.stderr)
        elif rank == 0:
            print(f"resumed from {path} at step {engine.global_steps}", flush=True)
    curve = Curve(out_dir / "curve.csv", args.resume) if rank == 0 else None
    # A bar where rank 0 owns a terminal; piped (launcher, CI) it stays off (disable=None)
    # and the labelled lines below carry the progress.
    bar = tqdm(total=args.steps, initial=engine.global_steps, disable=None if rank == 0
               else True, unit="step", dynamic_ncols=True)
    data, losses, first, val = batches(loader), [], None, None
    t0, tokens, rate_of = time.perf_counter(), 0, Throughput()
    start = engine.global_steps
    while engine.global_steps < args.steps:
        x, y = next(data)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        # every data-parallel rank trains its own batch; tensor-parallel ranks share one:
        # the rate is the whole job's, whatever the layout
        tokens += x.numel() * engine.dp_world_size
        step, value = engine.global_steps, loss.item()
        first = value if first is None else first
        losses.append(value)
        if step - start == WARMUP_STEPS:
            rate_of.start(tokens)
        if step % args.eval_every == 0 or step == args.steps:
            with rate_of.paused():  # validation is not training throughput
                val = validation_loss(engine, val_ids)
        if rank != 0:
            continue
        curve.add(step, value, val if step % args.eval_every == 0 or step == args.steps
                  else None)
        mean = sum(losses[-10:]) / len(losses[-10:])
        rate = rate_of(tokens)
        bar.update(1)
        bar.set_postfix(train=f"{mean:.3f}", val="-" if val is None else f"{val:.3f}",
                        tok_s=f"{rate:.0f}", refresh=False)
        if step % args.log_every == 0:
            bar.write(f"step {step}/{args.steps} | train loss (10-step mean) {mean:.3f} | "
                      f"val loss {'-' if val is None else f'{val:.3f}'} | "
                      f"{rate:.0f} tokens/s (all ranks, steady state)", file=sys.stdout)
            curve.flush()
    bar.close()
    engine.save_checkpoint(ckpt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state_mib = engine.runtime.state_bytes() / 2**20
    print(f"rank {rank}: peak RSS {peak:.0f} MiB, training state {state_mib:.1f} MiB; job: "
          f"{rate_of(tokens):.0f} tokens/s steady state, all ranks "
          f"({tokens / (time.perf_counter() - t0):.0f} including compilation and "
          f"validation)", flush=True)
    text = sample(engine, stoi, itos, n=args.sample_chars)
    if rank == 0:
        curve.flush()
        png = curve.plot()
        print("--- sample ---\n" + text)
        print(f"train loss {first if first is not None else math.nan:.3f} -> "
              f"{losses[-1] if losses else math.nan:.3f}, validation loss "
              f"{'-' if val is None else f'{val:.3f}'}; checkpoint {ckpt}, curve "
              f"{out_dir / 'curve.csv'}" + (f" and {png}" if png else
                                            " (pip install -e \".[plot]\" for curve.png)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
