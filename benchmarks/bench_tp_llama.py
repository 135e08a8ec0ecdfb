"""Tensor parallelism on a Hugging Face Llama: zerofx (layout from the graph, vocabulary and
sequence parallelism) vs PyTorch's DTensor TP, 2 ranks, same run.

    python benchmarks/bench_tp_llama.py [--steps 8] [--only zerofx-tp dtensor-tp ...]

Model: LlamaForCausalLM from a config (no download), vocab 8192, hidden 256, 4 layers, 8
query / 4 key-value heads, SwiGLU 704; batch 4 x 128 tokens, the same on both ranks (TP
splits the model, not the data); called as users call it, ``model(input_ids,
labels=labels)``; bf16 compute (zerofx's bf16 block, autocast for DTensor), AdamW (the
peer's for-loop AdamW: its fused and foreach ones refuse a mix of DTensor and plain
parameters, which this model has: the norms are not split).

zerofx runs without a plan (the layout read from the graph): ``zerofx-tp`` keeps the
vocabulary whole, ``zerofx-tp-vocab`` splits embedding, LM head and cross-entropy,
``zerofx-tp-vocab-sp`` adds sequence parallelism. ``dtensor-tp`` is parallelize_module with
the same Megatron plan for attention and MLP; ``dtensor-tp-loss-parallel`` also splits the
embedding (RowwiseParallel) and the LM head (ColwiseParallel, Shard(-1) logits) and takes
the loss under ``loss_parallel()``; ``-compiled`` runs that model through torch.compile
(Inductor), PyTorch's strongest TP setting for this model.

Activation memory is what autograd saves for backward in one step (saved_tensors_hooks,
bytes of distinct storages this rank holds), so logits and per-token activations show.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from multiproc import run_ranks  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, KV, FFN, B, T = 8192, 256, 4, 8, 4, 704, 4, 128


def _model():
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV, max_position_embeddings=T)
    return tr.LlamaForCausalLM(cfg).train()


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    return ids, ids.clone()


class _Saved:
    """Bytes of the distinct storages autograd saves for backward while active."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        local = getattr(t, "_local_tensor", t)  # a DTensor's piece on this rank
        try:
            key, size = local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()
        except RuntimeError:  # a wrapper without a storage of its own: count its elements
            key, size = id(local), local.numel() * local.element_size()
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += size
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _timed(step, steps: int, warmup: int = 2):
    times, saved = [], None
    for i in range(warmup + steps):
        ids, labels = _batch(i)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        meter = _Saved()
        loss = step(ids, labels, meter)
        times.append(time.perf_counter() - t0)
        saved = meter.bytes
    return statistics.median(times[warmup:]), saved / 2**20, float(loss)


def run_zerofx(steps: int, vocab: bool, sp: bool, bf16: bool = True):
    import zerofx

    model = _model()
    cfg = {"bf16": {"enabled": bf16}, "train_micro_batch_size_per_gpu": B,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "tensor_parallel": {"size": 2, "vocab_parallel": vocab, "sequence_parallel": sp}}
    engine, *_ = zerofx.initialize(model=model, config=cfg)

    def step(ids, labels, meter):
        with meter.hooks():
            loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        return loss

    return _timed(step, steps)


def run_dtensor(steps: int, loss_parallel: bool, compiled: bool = False, bf16: bool = True):
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   loss_parallel as lp, parallelize_module)

    model = _model()
    mesh = init_device_mesh("cpu", (2,))
    plan = {f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
    plan |= {"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
             "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    if loss_parallel:
        parallelize_module(model, mesh, {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    if compiled:  # torch.compile (Inductor) over the parallelized model
        model = torch.compile(model)
    # fused and foreach refuse a mix of DTensor (split) and plain (norm) parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

    def step(ids, labels, meter):
        with meter.hooks(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if loss_parallel:  # the loss outside the model, on Shard(-1) logits
                logits = model(input_ids=ids).logits
                with lp():
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                           labels[:, 1:].flatten())
                    loss.backward()
            else:
                loss = model(input_ids=ids, labels=labels).loss
        if not loss_parallel:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.full_tensor() if hasattr(loss, "full_tensor") else loss

    return _timed(step, steps)


RUNNERS = {
    "zerofx-tp": lambda s: run_zerofx(s, vocab=False, sp=False),
    "zerofx-tp-vocab": lambda s: run_zerofx(s, vocab=True, sp=False),
    "zerofx-tp-vocab-sp": lambda s: run_zerofx(s, vocab=True, sp=True),
    "zerofx-tp-vocab-fp32": lambda s: run_zerofx(s, vocab=True, sp=False, bf16=False),
    "zerofx-tp-vocab-sp-fp32": lambda s: run_zerofx(s, vocab=True, sp=True, bf16=False),
    "dtensor-tp": lambda s: run_dtensor(s, loss_parallel=False),
    "dtensor-tp-loss-parallel": lambda s: run_dtensor(s, loss_parallel=True),
    "dtensor-tp-loss-parallel-compiled": lambda s: run_dtensor(s, loss_parallel=True,
                                                               compiled=True),
    # on a host without AVX-512 BF16, fp32 may be the peer's faster setting
    "dtensor-tp-loss-parallel-compiled-fp32": lambda s: run_dtensor(
        s, loss_parallel=True, compiled=True, bf16=False),
}


def _rank_entry(rank, world, name, steps):
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    try:
        return RUNNERS[name](steps)
    except Exception as e:  # a peer that cannot run this model is reported, not fatal
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main(argv=None):
    import platform

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    # the eager DTensor runs take seconds a step here: asked for by name (--only)
    default = [n for n in RUNNERS if not n.startswith("dtensor") or n.endswith(
        ("compiled", "compiled-fp32"))]
    p.add_argument("--only", nargs="*", default=default, choices=list(RUNNERS))
    args = p.parse_args(argv)
    rows = []
    for name in args.only:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append((name, run_ranks(_rank_entry, 2, args=(name, args.steps),
                                     timeout_s=900, fresh=True)))
    params = sum(q.numel() for q in _model().parameters())
    print(f"\nHF Llama {params / 1e6:.1f}M params, 2 ranks (gloo), batch {B}x{T}, bf16, "
          f"{args.steps} timed steps; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| run | median step (ms) | saved activations per rank (MiB) | last loss |")
    print("|---|---|---|---|")
    for name, res in rows:
        if res[0][0] is None:
            print(f"| {name} | failed: {res[0][2]} | | |")
            continue
        ms = max(r[0] for r in res) * 1e3
        print(f"| {name} | {ms:.1f} | {max(r[1] for r in res):.1f} | {res[0][2]:.4f} |")


if __name__ == "__main__":
    main()
