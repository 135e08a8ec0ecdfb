"""Tiny random-init Hugging Face models, called as their users call them (``labels=``).

Nothing is downloaded: each model is built from a config. Dropout is switched off (in the
config where the model reads a float, on every nn.Dropout otherwise) so a run compares
exactly with a single-process reference.
"""
from __future__ import annotations

import torch

VOCAB = 64
HF_MODELS = ("gpt2", "bert_mlm", "llama", "t5", "mixtral")

# Megatron's layout of each model's first layer and of its vocabulary (word embedding, LM
# head): what zerofx must read from its graph.
TP_LAYOUTS = {
    "llama": {"model.layers.0.self_attn." + n: ("colwise", 1) for n in ("q_proj", "k_proj",
                                                                         "v_proj")}
    | {"model.embed_tokens": ("vocab", 1), "lm_head": ("colwise", 1),  # untied
       "model.layers.0.self_attn.o_proj": ("rowwise", 1),
       "model.layers.0.mlp.gate_proj": ("colwise", 1), "model.layers.0.mlp.up_proj":
       ("colwise", 1), "model.layers.0.mlp.down_proj": ("rowwise", 1)},
    "gpt2": {"transformer.wte": ("vocab", 1),  # tied to the LM head
             "transformer.h.0.attn.c_attn": ("colwise", 3),  # Conv1D, fused q|k|v
             "transformer.h.0.attn.c_proj": ("rowwise", 1),
             "transformer.h.0.mlp.c_fc": ("colwise", 1), "transformer.h.0.mlp.c_proj":
             ("rowwise", 1)},
    "bert_mlm": {"bert.encoder.layer.0.attention.self." + n: ("colwise", 1)
                 for n in ("query", "key", "value")}
    | {"bert.embeddings.word_embeddings": ("vocab", 1),  # tied to the MLM decoder
       "bert.encoder.layer.0.attention.output.dense": ("rowwise", 1),
       "bert.encoder.layer.0.intermediate.dense": ("colwise", 1),
       "bert.encoder.layer.0.output.dense": ("rowwise", 1)},
}
TP_LAYOUTS["t5"] = {"encoder.block.0.layer.0.SelfAttention." + n: ("colwise", 1)
                    for n in ("q", "k", "v")} | {
    "shared": ("vocab", 1),
    "encoder.block.0.layer.0.SelfAttention.o": ("rowwise", 1),
    "encoder.block.0.layer.1.DenseReluDense.wi": ("colwise", 1),
    "encoder.block.0.layer.1.DenseReluDense.wo": ("rowwise", 1),
    "decoder.block.0.layer.1.EncDecAttention.q": ("colwise", 1),  # cross-attention
    "decoder.block.0.layer.1.EncDecAttention.o": ("rowwise", 1)}


def _build(name: str):
    import transformers as T

    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32,
                                              n_layer=2, n_head=2, bos_token_id=0,
                                              eos_token_id=0))
    if name == "bert_mlm":  # cls.predictions.bias is decoder.bias: an alias
        return T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=32,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=64, max_position_embeddings=32))
    if name == "llama":  # grouped-query attention: 4 query heads, 2 kv heads
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    if name == "t5":  # encoder-decoder, shared embedding tied to the LM head
        return T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
            num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))
    if name == "mixtral":  # mixture of experts: top-2 of 4 experts per token
        return T.MixtralForCausalLM(T.MixtralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=32))
    if name in FUSED_MODELS:
        return _build_fused(name)
    raise KeyError(name)


# Architectures whose attention fuses or reshapes q, k and v in its own way (tests of
# tensor parallelism on fused projections: test_tp_fused.py).
FUSED_MODELS = ("phi3", "phi3_gqa", "bloom", "falcon", "falcon_gqa", "falcon_mq", "gptj",
                "distilbert_mlm", "llama_mq")


def _build_fused(name: str):
    import transformers as T

    small = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "phi3":  # fused qkv_proj split by slices; fused gate_up_proj chunked
        return T.Phi3ForCausalLM(T.Phi3Config(
            **small, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))
    if name == "phi3_gqa":  # the same with 2 key/value heads: [4 q | 2 k | 2 v] heads
        return T.Phi3ForCausalLM(T.Phi3Config(
            **small, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    if name == "bloom":  # query_key_value viewed as [B, T, heads, 3, hd], selected; alibi
        return T.BloomForCausalLM(T.BloomConfig(**small, hidden_size=32, n_layer=2, n_head=4))
    if name.startswith("falcon"):  # mha: as Bloom; gqa: [B, T, kv, group + 2, hd]; mq: 1 kv
        kw = {"falcon": dict(multi_query=False),
              "falcon_gqa": dict(new_decoder_architecture=True, num_kv_heads=2),
              "falcon_mq": dict(multi_query=True)}[name]
        return T.FalconForCausalLM(T.FalconConfig(
            **small, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=False,
            **kw))
    if name == "llama_mq":  # one key/value head for 4 query heads (multi-query)
        return T.LlamaForCausalLM(T.LlamaConfig(
            **small, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32))
    if name == "gptj":  # separate q/k/v, rotary embedding through aten.stack
        return T.GPTJForCausalLM(T.GPTJConfig(**small, n_embd=32, n_layer=2, n_head=4,
                                              rotary_dim=4, n_positions=32))
    if name == "distilbert_mlm":
        return T.DistilBertForMaskedLM(T.DistilBertConfig(
            vocab_size=VOCAB, pad_token_id=0, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
            max_position_embeddings=32))
    raise KeyError(name)


def make_hf(name: str):
    torch.manual_seed(0)
    model = _build(name)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def hf_batch(name: str, seed: int, *, n: int = 2, t: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    if name == "t5":
        return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (n, 5), generator=g)}
    return {"input_ids": ids, "labels": ids}


def train_on_hf_batches(engine, name: str, steps: int, dp_rank: int):
    """``steps`` training steps of ``engine`` on data-parallel rank ``dp_rank``'s batches
    (``hf_batch(name, 10 * step + dp_rank)``); returns (losses, the last output)."""
    losses = []
    for step in range(steps):
        out = engine(**hf_batch(name, 10 * step + dp_rank))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return losses, out


def one_process_reference(name: str, steps: int, dp: int, lr: float):
    """One process doing what ``train_on_hf_batches`` does on ``dp`` data-parallel ranks:
    per step every rank's batch, the mean of their losses, DeepSpeed's step (AdamW with
    weight decay 0.01, clipping at 1.0). Returns (model, each rank's losses, last output)."""
    from reference import deepspeed_step

    model = make_hf(name)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    want = [[] for _ in range(dp)]
    for step in range(steps):
        for dp_rank in range(dp):
            out = model(**hf_batch(name, 10 * step + dp_rank))
            (out.loss / dp).backward()
            want[dp_rank].append(out.loss.item())
        deepspeed_step(model, opt, 1.0)
    return model, want, out
