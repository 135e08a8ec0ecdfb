"""Per-rank parameter bytes at TP 2 and 4, architecture by architecture, against the whole
model.

    python benchmarks/bench_tp_archs.py [--tp 2 4]

Each Hugging Face architecture is built from a config (random init, nothing downloaded) at
d 256, 8 heads, 2 layers, MLP 1024, vocabulary 4096, fp32, and its tensor-parallel layout is
read from its graph as zerofx.initialize reads it (no plan). The bytes are the plan's: each
rank's local piece of every parameter, what the runtime allocates. "projections" are the
2-D weights of the attention and MLP modules of the layers (the goal: 1/tp of them per
rank; key/value heads fewer than the ranks are held by rank groups, so a grouped model's
k/v rows count 1/kv_heads per rank); "left whole" lists those the layout keeps
whole, with the reason plan.txt gives. A markdown table goes to stdout for
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import logging

import torch

import zerofx
from zerofx.plan import make_plan
from zerofx.tp.layout import resolve_tp_layout

D, HEADS, LAYERS, FF, VOCAB = 256, 8, 2, 1024, 4096


def _models():
    import transformers as T

    ids = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    falcon = dict(**ids, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  alibi=False)
    return {  # name: (model, prefix of its layers' modules)
        "Phi-3 (fused qkv_proj, gate_up_proj)": (T.Phi3ForCausalLM(T.Phi3Config(
            **ids, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS)), "model.layers."),
        "Phi-3 (grouped: 2 kv heads)": (T.Phi3ForCausalLM(T.Phi3Config(
            **ids, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2)), "model.layers."),
        "Bloom (query_key_value, alibi)": (T.BloomForCausalLM(T.BloomConfig(
            **ids, hidden_size=D, n_layer=LAYERS, n_head=HEADS)), "transformer.h."),
        "Falcon (multi-head)": (T.FalconForCausalLM(T.FalconConfig(
            **falcon, multi_query=False)), "transformer.h."),
        "Falcon (new decoder, 2 kv heads)": (T.FalconForCausalLM(T.FalconConfig(
            **falcon, new_decoder_architecture=True, num_kv_heads=2)), "transformer.h."),
        "Falcon (multi-query)": (T.FalconForCausalLM(T.FalconConfig(
            **falcon, multi_query=True)), "transformer.h."),
        "GPT-J (rotary via stack)": (T.GPTJForCausalLM(T.GPTJConfig(
            **ids, n_embd=D, n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_positions=64,
            n_inner=FF)), "transformer.h."),
        "DistilBERT (masked LM)": (T.DistilBertForMaskedLM(T.DistilBertConfig(
            vocab_size=VOCAB, pad_token_id=0, dim=D, n_layers=LAYERS, n_heads=HEADS,
            hidden_dim=FF)), "distilbert.transformer.layer."),
        "Llama (multi-query: 1 kv head)": (T.LlamaForCausalLM(T.LlamaConfig(
            **ids, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=1)), "model.layers."),
        "Llama (grouped: 2 kv heads)": (T.LlamaForCausalLM(T.LlamaConfig(
            **ids, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2)), "model.layers."),
    }


def _row(model, prefix: str, tp: int) -> tuple:
    cfg = zerofx.Config.from_dict({"tensor_parallel": {"size": tp}})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 16), generator=g)
    layout = resolve_tp_layout(model, cfg, {"input_ids": ids, "labels": ids})
    named = list(model.named_parameters())
    plan = make_plan(named, cfg, rank=0, world_size=tp, tp_layout=layout)
    whole = {n: p.numel() * p.element_size() for n, p in named}
    local = {s.name: s.numel * 4 for s in plan.params}  # fp32
    proj = [n for n, p in named if n.startswith(prefix) and p.dim() == 2]
    left = sorted({n.split(".")[-2] for n in proj if plan.slot(n).tp is None})
    return (sum(whole.values()), sum(local.values()), sum(whole[n] for n in proj),
            sum(local[n] for n in proj), left)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the layout's warning lists what the table shows
    head = "".join(f" per rank (TP {t}) | ratio | projections per rank | ratio | left whole |"
                   for t in args.tp)
    print(f"| architecture | whole model | projections whole |{head}")
    print("|---|---:|---:|" + "---:|---:|---:|---:|---|" * len(args.tp))
    mb = 2 ** 20
    for name, (model, prefix) in _models().items():
        cells = ""
        for tp in args.tp:
            total, mine, p_total, p_mine, left = _row(model, prefix, tp)
            cells += (f" {mine / mb:.2f} MiB | {mine / total:.3f} | {p_mine / mb:.2f} MiB | "
                      f"{p_mine / p_total:.3f} | {', '.join(left) or '-'} |")
        print(f"| {name} | {total / mb:.2f} MiB | {p_total / mb:.2f} MiB |{cells}")


if __name__ == "__main__":
    main()
