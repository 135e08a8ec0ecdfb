"""A DeepSpeed user's masked-LM pre-training script, as DeepSpeedExamples' HelloDeepSpeed one
is written (training/HelloDeepSpeed/train_bert_ds.py), tiny and on synthetic text.

It touches DeepSpeed's API the way that script does: the rank read from the RANK variable,
torch.device(get_accelerator().device_name(), local_rank) when get_accelerator().is_available(),
its own DataLoader (shuffled, the same on every rank: no training_data), deepspeed.initialize
with no args (model=, model_parameters=model.parameters(), config=<dict>; it starts the
process group itself), engine.load_checkpoint(load_dir=) -> (path, client_state) to resume,
engine.train(), engine.parameters(), a model that returns its loss and is called with keyword
tensors (engine(**batch)), backward/step, loss.item(), and
engine.save_checkpoint(save_dir=, client_state={"checkpoint_step": step}) every
--checkpoint_every steps and once more at the end (the same tag again, as the original does).

The model is a RoBERTa encoder from transformers with a tiny random config (dropout 0, so
the numbers are deterministic) and a masked-LM head of our own tied to the word embeddings
that predicts only the masked positions (torch.nonzero + index_select: data-dependent
shapes), as the original's head does. Sequences have different lengths, padded per batch.

Rank 0 writes {"losses": [[step, loss], ...], "resumed_from": the checkpoint_step of the
client_state loaded, or null} as JSON to --losses_out.
"""
import argparse
import json
import os
import pathlib
import random

import deepspeed
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import RobertaConfig, RobertaModel

from deepspeed.accelerator import get_accelerator

BOS, PAD, EOS, MASK = 0, 1, 2, 3
FIRST_WORD = 4  # ids below are special tokens


def is_rank_0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log_rank_0(message: str) -> None:
    if is_rank_0():
        print(f"[Rank 0] {message}", flush=True)


# ---- data ---------------------------------------------------------------------------------
def synthetic_sentences(count: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Word sequences with structure a masked LM can learn: each walks the vocabulary with a
    fixed stride from a random start."""
    rng = np.random.default_rng(seed)
    words = vocab_size - FIRST_WORD
    sentences = []
    for _ in range(count):
        length = int(rng.integers(5, 13))
        start, stride = int(rng.integers(words)), int(rng.integers(1, 4))
        sentences.append([FIRST_WORD + (start + i * stride) % words for i in range(length)])
    return sentences


def mask_tokens(words: list[int], vocab_size: int, mask_prob: float,
                random_replace_prob: float, unmask_replace_prob: float):
    """BERT's masking with numpy's global RNG (as the original): some inner positions become
    the mask token, a share of those a random word or the word itself. Returns the input ids
    and the labels (PAD where nothing is predicted)."""
    ids = np.array([BOS] + words + [EOS])
    inner = np.arange(1, len(ids) - 1)
    how_many = max(int(mask_prob * len(inner) + np.random.rand()), 1)
    chosen = np.zeros(len(ids), dtype=bool)
    chosen[np.random.choice(inner, how_many, replace=False)] = True
    labels = np.where(chosen, ids, PAD)
    ids[chosen] = MASK
    draw = np.random.rand(len(ids))
    keep = chosen & (draw < unmask_replace_prob)
    swap = chosen & (draw >= unmask_replace_prob) & (
        draw < unmask_replace_prob + random_replace_prob)
    ids[keep] = labels[keep]
    ids[swap] = np.random.randint(FIRST_WORD, vocab_size, size=int(swap.sum()))
    return ids.tolist(), labels.tolist()


class MaskedSentences(Dataset):
    """Masks each sentence anew when it is read (the original's map-style dataset)."""

    def __init__(self, sentences, vocab_size, **masking):
        self.sentences, self.vocab_size, self.masking = sentences, vocab_size, masking

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, index):
        return mask_tokens(self.sentences[index], self.vocab_size, **self.masking)


def pad_batch(batch):
    longest = max(len(ids) for ids, _ in batch)
    src = torch.full((len(batch), longest), PAD, dtype=torch.long)
    tgt = torch.full((len(batch), longest), PAD, dtype=torch.long)
    for row, (ids, labels) in enumerate(batch):
        src[row, :len(ids)] = torch.tensor(ids)
        tgt[row, :len(labels)] = torch.tensor(labels)
    return {"src_tokens": src, "tgt_tokens": tgt,
            "attention_mask": src.ne(PAD).to(src.dtype)}


class Forever:
    """Restarts the loader when it runs out (a new shuffle each time)."""

    def __init__(self, loader):
        self.loader, self.it = loader, iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def make_data_iterator(args) -> Forever:
    dataset = MaskedSentences(synthetic_sentences(args.num_sentences, args.vocab_size, 11),
                              args.vocab_size, mask_prob=0.15, random_replace_prob=0.1,
                              unmask_replace_prob=0.1)
    return Forever(DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                              collate_fn=pad_batch))


# ---- model --------------------------------------------------------------------------------
class MaskedPositionsHead(nn.Module):
    """dense -> gelu -> layer norm -> vocabulary scores, for the masked positions only; the
    output projection is the word embedding matrix."""

    def __init__(self, config: RobertaConfig, word_embedding: nn.Parameter):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embedding
        nn.init.normal_(self.dense.weight, std=config.initializer_range)
        nn.init.zeros_(self.dense.bias)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, features, positions=None):
        if positions is not None:
            features = features.reshape(-1, features.shape[-1]).index_select(0, positions)
        return self.decoder(self.norm(F.gelu(self.dense(features))))


class MaskedLM(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.encoder = RobertaModel(config)  # with its pooler, unused by the loss
        self.lm_head = MaskedPositionsHead(config, self.encoder.embeddings.word_embeddings.weight)

    def forward(self, src_tokens, attention_mask, tgt_tokens):
        hidden, *_ = self.encoder(input_ids=src_tokens, attention_mask=attention_mask,
                                  return_dict=False)
        positions = torch.nonzero((tgt_tokens != self.config.pad_token_id).view(-1)).view(-1)
        scores = self.lm_head(hidden, positions)
        target = tgt_tokens.view(-1).index_select(0, positions)
        return F.cross_entropy(scores.view(-1, self.config.vocab_size), target, ignore_index=-1)


def make_model(args) -> MaskedLM:
    config = RobertaConfig(
        vocab_size=args.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=40, type_vocab_size=1,
        initializer_range=0.02, layer_norm_eps=1e-5, bos_token_id=BOS, pad_token_id=PAD,
        eos_token_id=EOS)
    return MaskedLM(config)


# ---- training -----------------------------------------------------------------------------
def train(args):
    device = (torch.device(get_accelerator().device_name(), args.local_rank)
              if args.local_rank > -1 and get_accelerator().is_available()
              else torch.device("cpu"))
    if args.checkpoint_dir:
        exp_dir = pathlib.Path(args.checkpoint_dir) / "bert_pretrain.run"
        if is_rank_0():
            exp_dir.mkdir(parents=True, exist_ok=False)
            (exp_dir / "hparams.json").write_text(json.dumps(vars(args), indent=1))
    else:
        exp_dir = pathlib.Path(args.load_checkpoint_dir)

    data_iterator = make_data_iterator(args)
    model = make_model(args)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "optimizer": {"type": "Adam", "params": {"lr": 5e-3}},
        "zero_optimization": {"stage": 2},
    }
    if args.dtype != "fp32":
        ds_config[args.dtype] = {"enabled": True}
    model, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config)
    log_rank_0("DeepSpeed engine created")

    start_step, client_state = 1, None
    if args.load_checkpoint_dir is not None:
        _, client_state = model.load_checkpoint(load_dir=args.load_checkpoint_dir)
        start_step = client_state["checkpoint_step"] + 1

    log_rank_0(f"parameters: {sum(p.numel() for p in model.parameters()):,d}")
    model.train()
    losses = []
    for step, batch in enumerate(data_iterator, start=start_step):
        if step >= args.num_iterations:
            break
        for key, value in batch.items():
            batch[key] = value.to(device)
        loss = model(**batch)
        model.backward(loss)
        model.step()
        losses.append([step, loss.item()])
        if step % args.log_every == 0:
            log_rank_0(f"step {step} loss {np.mean([l for _, l in losses]):.4f}")
        if step % args.checkpoint_every == 0:
            model.save_checkpoint(save_dir=exp_dir, client_state={"checkpoint_step": step})
    if step % args.checkpoint_every != 0:  # the original's final save
        model.save_checkpoint(save_dir=exp_dir, client_state={"checkpoint_step": step})

    if is_rank_0() and args.losses_out:
        with open(args.losses_out, "w") as f:
            resumed_from = None if client_state is None else client_state["checkpoint_step"]
            json.dump({"losses": losses, "resumed_from": resumed_from}, f, indent=1)
    return exp_dir


def parse_args():
    parser = argparse.ArgumentParser(description="BERT-style masked LM with DeepSpeed")
    parser.add_argument("--checkpoint_dir", type=str, default=None)
    parser.add_argument("--load_checkpoint_dir", type=str, default=None)
    parser.add_argument("--num_iterations", type=int, default=11)
    parser.add_argument("--checkpoint_every", type=int, default=5)
    parser.add_argument("--log_every", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_sentences", type=int, default=48)
    parser.add_argument("--vocab_size", type=int, default=64)
    parser.add_argument("--dtype", type=str, default="fp32", choices=["fp32", "fp16", "bf16"])
    # The deepspeed launcher passes --local_rank; under torchrun it comes from LOCAL_RANK.
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    parser.add_argument("--losses_out", type=str, default=None)
    args = parser.parse_args()
    if (args.checkpoint_dir is None) == (args.load_checkpoint_dir is None):
        parser.error("give exactly one of --checkpoint_dir and --load_checkpoint_dir")
    return args


if __name__ == "__main__":
    torch.manual_seed(42)
    np.random.seed(0)
    random.seed(0)
    train(parse_args())
