"""The first step of a model: zerofx's compile against torch.compile(backend="aot_eager").

    python benchmarks/bench_first_step.py [--models gpt2,bert,llama] [--steps 5] [--with-breaks]

Hugging Face GPT-2, BERT (HelloDeepSpeed's size: 6 layers, hidden 256, 8 heads, ff 512,
sequence 128, micro-batch 8) and Llama, random-init, one process, bf16. zerofx runs through
zerofx.initialize (ZeRO-2 config, fused AdamW, clipping); the peer is the same model under
torch.compile(backend="aot_eager") with bf16 autocast and torch's AdamW (fused on CPU), so
both trace with Dynamo and AOTAutograd and neither runs Inductor. Reported: the first step
(compilation included), and the median of the next steps. Each framework in a fresh process
(Dynamo's caches would otherwise favour the second).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
from tabulate import tabulate

SEQ, BATCH, VOCAB = 128, 8, 30522


def build(name: str):
    import transformers as T

    torch.manual_seed(0)
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=256,
                                              n_layer=6, n_head=8, n_inner=512))
    if name == "bert":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=256,
                                              num_hidden_layers=6, num_attention_heads=8,
                                              intermediate_size=512,
                                              max_position_embeddings=SEQ))
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=256,
                                            intermediate_size=512, num_hidden_layers=6,
                                            num_attention_heads=8, num_key_value_heads=4,
                                            max_position_embeddings=SEQ))


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def run_zerofx(name: str, steps: int):
    import zerofx

    engine, *_ = zerofx.initialize(model=build(name), config={
        "train_micro_batch_size_per_gpu": BATCH, "bf16": {"enabled": True},
        "gradient_clipping": 1.0, "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 2}})

    def step(k):
        loss = engine(**batch(k)).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    return _timed(step, steps)


def run_zerofx_breaking(name: str, steps: int):
    """zerofx as before zerofx/dynamo_settings.py: transformers' print-once advisories break
    the graph (GPT-2's loss_function calls one every forward)."""
    from zerofx.dynamo_settings import once_logging_breaks

    with once_logging_breaks():
        return run_zerofx(name, steps)


def run_aot_eager(name: str, steps: int):
    model = build(name)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(**batch(k)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return _timed(step, steps)


def _timed(step, steps):
    times, losses = [], []
    for k in range(steps):
        t0 = time.perf_counter()
        losses.append(step(k))
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:]), losses[-1]


RUNNERS = {"zerofx": run_zerofx, "aot_eager+autocast": run_aot_eager}
OPTIONAL = {"zerofx, advisories breaking the graph": run_zerofx_breaking}


def _child(fn, name, steps, q):
    torch.set_num_threads(2)
    q.put(fn(name, steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,bert,llama")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--with-breaks", action="store_true",
                    help="also run zerofx with transformers' print-once advisories breaking "
                         "the graph (as before zerofx/dynamo_settings.py)")
    args = ap.parse_args()
    runners = {**RUNNERS, **(OPTIONAL if args.with_breaks else {})}
    rows = []
    ctx = mp.get_context("spawn")
    for name in args.models.split(","):
        first = {}
        for fw, fn in runners.items():
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(fn, name, args.steps, q))
            p.start()
            t_first, t_step, loss = q.get()
            p.join()
            first[fw] = t_first
            rows.append([name, fw, f"{t_first:.1f}", f"{t_step * 1e3:.0f}", f"{loss:.4f}"])
            print(rows[-1], flush=True)
        rows[-len(runners)].append(f"{first['zerofx'] / first['aot_eager+autocast']:.2f}x")
    print(tabulate(rows, headers=["model", "framework", "first step (s)",
                                  "median next step (ms)", "last loss", "first step vs peer"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
