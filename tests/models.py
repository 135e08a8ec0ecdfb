"""Small models the tests compile: an MLP and a pre-norm transformer block with a loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x, y):
        return F.mse_loss(self.fc2(F.gelu(self.fc1(x))), y)


class Block(nn.Module):
    """A GPT block: causal self-attention and an MLP, each behind a LayerNorm."""

    def __init__(self, d: int = 32, heads: int = 4, vocab: int = 64, head_attr: str = "heads"):
        super().__init__()
        # head_attr: where the head count lives; "h" is a name zerofx does not know
        self.head_attr = head_attr
        setattr(self, head_attr, heads)
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # No qkv bias: the key bias gets a gradient of pure rounding noise (softmax ignores a
        # per-row constant), which Adam amplifies to a full lr step: no tight reference holds.
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        B, T, C = x.shape  # (batch, time, channels)
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        H = getattr(self, self.head_attr)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(t: int, hd: int, device):
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device).float() / hd))
    freqs = torch.outer(torch.arange(t, device=device).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class LlamaStyleAttention(nn.Module):
    """Attention with separate q/k/v/o projections (HF naming) and a gated MLP left out."""

    def __init__(self, d: int = 32, heads: int = 4, vocab: int = 64, rope: bool = False):
        super().__init__()
        self.num_heads, self.rope = heads, rope
        self.emb = nn.Embedding(vocab, d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope:  # Hugging Face Llama's rotary embedding, rotate_half included
            cos, sin = _rope_tables(T, C // self.num_heads, x.device)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, T, C))
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class NormedMLP(nn.Module):
    """fc1's features go through a LayerNorm before fc2: no Megatron split fits."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)

    def forward(self, x, y):
        return F.mse_loss(self.fc2(self.ln(self.fc1(x))), y)


class VocabModel(nn.Module):
    """An embedding with a padding row and an untied LM head whose cross-entropy ignores a
    real token id (40: on the second half of a split vocabulary of 64) and reduces by mean."""

    def __init__(self, d: int = 32, vocab: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=3)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx, targets):
        x = self.emb(idx)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=40)


def vocab_batch(n: int = 2, t: int = 8, seed: int = 0):
    idx, targets = block_batch(n, t, seed=seed)
    idx[0, :2] = 3  # the padding row
    targets[0, :3] = 40  # ignored targets
    return idx, targets


def mlp_batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g)


def block_batch(n: int = 2, t: int = 8, vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(vocab, (n, t), generator=g)
    return idx, torch.randint(vocab, (n, t), generator=g)


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name in ("llama_attn", "llama_rope"):
        return LlamaStyleAttention(rope=name == "llama_rope"), block_batch()
    if name == "vocab":
        return VocabModel(), vocab_batch()
    if name == "mlp_norm":
        return NormedMLP(), mlp_batch()
    if name == "block_h":  # the head count under a name zerofx does not know
        return Block(head_attr="h"), block_batch()
    return (MLP(), mlp_batch()) if name == "mlp" else (Block(), block_batch())
