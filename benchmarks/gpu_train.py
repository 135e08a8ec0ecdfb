"""Single-device training of the main job's model: zerofx vs torch.compile + autocast + fused AdamW.

    python benchmarks/gpu_train.py                      # on the GPU (gpu_check.sh runs it)
    python benchmarks/gpu_train.py --device cpu --steps 4 --warmup 1 --peer_backend aot_eager

The model, data and config are the main job's (examples/train_gpt.py, its sonnets and
examples/ds_config.json: bf16, Adam with warmup, clipping 1.0). zerofx runs it through
zerofx.initialize on one device (ZeRO on one rank: nothing to shard; the fused kernels and
the passes do the work); the peer is the same model, same initial weights and same batches
under torch.compile (Inductor) with bf16 autocast and torch's fused AdamW, its strongest
single-device setting. Steps after ``--warmup`` (which include compilation) are timed, with
the device synchronised; the table goes to stdout (markdown, for benchmarks/RESULTS.md).
Exit status 1 if a loss is not finite, if the first losses (same weights, same batch)
differ by more than bf16's rounding, or if zerofx's last losses are more than 10% above the
peer's (the two must train alike, not only fast).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BATCH, LR, WARMUP_LR_STEPS = 16, 3e-3, 50


def _main_job():
    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "examples" / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batches(ids, block, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block - 1, (BATCH,), generator=g)
        yield (torch.stack([ids[s:s + block] for s in starts]),
               torch.stack([ids[s + 1:s + 1 + block] for s in starts]))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(step_fn, batches, device, warmup):
    """Losses of every step, and the seconds the steps after ``warmup`` took."""
    losses, t0 = [], None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        losses.append(step_fn(x.to(device), y.to(device)))
    _sync(device)
    return [float(v) for v in losses], time.perf_counter() - t0


def _zerofx(job, vocab, device, config):
    import zerofx

    torch.manual_seed(1337)
    engine, *_ = zerofx.initialize(model=job.GPT(vocab, block=job.BLOCK).to(device),
                                   config=config)

    def step(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss.detach()
    step.engine = engine  # for callers that read its state (gpu_check's offload run)
    return step


def _peer(job, vocab, device, backend):
    torch.manual_seed(1337)
    model = job.GPT(vocab, block=job.BLOCK).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(k, WARMUP_LR_STEPS) /
                                              WARMUP_LR_STEPS)
    compiled = torch.compile(model, backend=backend)

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20, help="untimed first steps (compilation)")
    p.add_argument("--peer_backend", default="inductor",
                   help="the peer's torch.compile backend (aot_eager: a quick CPU smoke run)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    job = _main_job()
    text = job.DATA.read_text()
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    config = json.loads((ROOT / "examples" / "ds_config.json").read_text())
    config["steps_per_print"] = 10**9
    rows = []
    for name, make in (("zerofx (bf16, fused Adam, ZeRO-2 config on one rank)",
                        lambda: _zerofx(job, len(stoi), device, config)),
                       (f"torch.compile ({args.peer_backend}) + autocast bf16 + fused AdamW",
                        lambda: _peer(job, len(stoi), device, args.peer_backend))):
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses, seconds = _run(make(), _batches(ids, job.BLOCK, args.steps), device,
                               args.warmup)
        tokens = (args.steps - args.warmup) * BATCH * job.BLOCK
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" \
            else float("nan")
        tail = losses[-10:]
        rows.append((name, tokens / seconds, losses[0], sum(tail) / len(tail), peak))
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{label}, torch {torch.__version__}, main job's GPT, batch {BATCH} x "
          f"{job.BLOCK} tokens, {args.steps} steps ({args.warmup} untimed)\n")
    print("| framework | tokens/s | first loss | last-10 mean loss | peak device MiB |")
    print("|---|---|---|---|---|")
    for name, rate, first, last, peak in rows:
        print(f"| {name} | {rate:.0f} | {first:.3f} | {last:.3f} | {peak:.0f} |")
    (_, _, first_ours, ours, _), (_, _, first_theirs, theirs, _) = rows
    if not all(math.isfinite(r[3]) for r in rows):
        print("a loss is not finite", file=sys.stderr)
        return 1
    if abs(first_ours - first_theirs) > 0.02 * first_theirs:  # bf16's rounding, not more
        print(f"the first losses differ ({first_ours:.4f} vs {first_theirs:.4f}) though the "
              f"weights and the batch are the same", file=sys.stderr)
        return 1
    if ours > 1.10 * theirs:
        print(f"zerofx's loss {ours:.3f} is more than 10% above the peer's {theirs:.3f}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
