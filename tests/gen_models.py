"""A small grammar of what users write, for generated tests (tests/test_generated.py).

A ``Spec`` (picklable: rank processes rebuild the model from it) names a trunk, its
activation, norm, how the model returns and where the loss is taken; ``build(spec, seed)``
makes the model, ``batch(spec, seed)`` one micro-batch, ``loss_of(spec, model, batch)`` the
loss as the user's loop would compute it (inside the model, or outside on ``.float()``
outputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

B, D, V, T, CLASSES = 4, 16, 11, 6, 5
TOKEN_TRUNKS = ("sdpa", "mha", "encoder_layer", "lstm", "gru", "gated_mlp")
TRUNKS = ("mlp", "conv1d", "conv2d") + TOKEN_TRUNKS
ACTS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}
NORMS = ("none", "layer", "rms", "batch")
OUTPUTS = ("tensor", "tuple", "dict", "model_output")


@dataclass(frozen=True)
class Spec:
    trunk: str
    act: str = "gelu"
    norm: str = "none"  # "batch": BatchNorm on conv and mlp trunks, LayerNorm elsewhere
    residual: bool = False
    tied: bool = False  # token trunks: the head shares the embedding's weight
    frozen: bool = False  # the first layer does not train
    buffer: bool = False  # a registered buffer scales the features
    output: str = "tensor"
    loss_inside: bool = True
    # token trunks: the tokens also attend over a frozen fp32 memory (Whisper's shape: under
    # bf16 a compute-dtype query meets fp32 keys and values)
    memory: bool = False


def _norm(kind: str, width: int, conv: bool = False) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(width)
    if kind == "rms":
        return nn.RMSNorm(width)
    if kind == "batch":
        return (nn.BatchNorm2d if conv else nn.BatchNorm1d)(width)
    return nn.Identity()


class _Attention(nn.Module):
    """Causal self-attention on F.scaled_dot_product_attention (a bias on q, k, v)."""

    def __init__(self, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, D // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, D))


class _Mixer(nn.Module):
    """One token-mixing trunk, its norm, activation and residual."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        kind = spec.trunk
        if kind == "sdpa":
            self.core = _Attention()
        elif kind == "mha":
            self.core = nn.MultiheadAttention(D, 2, batch_first=True)
        elif kind == "encoder_layer":
            self.core = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True)
        elif kind in ("lstm", "gru"):
            self.core = (nn.LSTM if kind == "lstm" else nn.GRU)(D, D, batch_first=True)
        else:  # gated_mlp: down(act(gate(x)) * up(x))
            self.gate, self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), \
                nn.Linear(2 * D, D)
        self.act = ACTS[spec.act]()
        self.norm = _norm("layer" if spec.norm == "batch" else spec.norm, D)

    def forward(self, x):
        kind = self.spec.trunk
        if kind == "mha":
            y = self.core(x, x, x, need_weights=False)[0]
        elif kind in ("lstm", "gru"):
            y = self.core(x)[0]
        elif kind == "gated_mlp":
            y = self.down(self.act(self.gate(x)) * self.up(x))
        else:
            y = self.core(x)
        y = self.norm(y if kind == "gated_mlp" else self.act(y))
        return x + y if self.spec.residual else y


class GenModel(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        if spec.trunk == "mlp":
            self.first = nn.Linear(D, 4 * D)
            self.body = nn.Sequential(_norm(spec.norm, 4 * D), ACTS[spec.act](),
                                      nn.Linear(4 * D, D))
        elif spec.trunk == "conv1d":
            self.first = nn.Conv1d(4, D, 3, padding=1)
            self.body = nn.Sequential(_norm("batch" if spec.norm == "batch" else "none", D),
                                      ACTS[spec.act](),
                                      nn.Conv1d(D, D, 3, padding=1))
        elif spec.trunk == "conv2d":
            self.first = nn.Conv2d(3, D, 3, padding=1)
            self.body = nn.Sequential(_norm("batch" if spec.norm == "batch" else "none", D,
                                            conv=True), ACTS[spec.act](),
                                      nn.Conv2d(D, D, 3, padding=1))
        else:
            self.first = nn.Embedding(V, D, padding_idx=0)
            self.body = _Mixer(spec)
        width = V if spec.trunk in TOKEN_TRUNKS else CLASSES
        self.head = nn.Linear(D, width, bias=not spec.tied)
        if spec.tied:
            self.head.weight = self.first.weight
        if spec.frozen and not spec.tied:  # a tied weight trains through the head
            self.first.requires_grad_(False)
        if spec.buffer:
            self.register_buffer("scale", torch.rand(D) + 0.5)
        if spec.memory and spec.trunk in TOKEN_TRUNKS:
            self.memory = nn.Parameter(torch.randn(3, D), requires_grad=False)
            self.kv = nn.Linear(D, 2 * D)

    def attend_memory(self, h):
        """Cross-attention of the tokens over the memory: SDPA on the sdpa trunk, an
        explicit softmax(q k^T) v elsewhere."""
        k, v = self.kv(self.memory).expand(h.shape[0], -1, -1).chunk(2, -1)
        if self.spec.trunk == "sdpa":
            return h + F.scaled_dot_product_attention(h, k, v)
        return h + torch.softmax(h @ k.transpose(1, 2) / D ** 0.5, -1) @ v

    def features(self, x):
        h = self.first(x)
        if self.spec.trunk == "mlp":
            h = self.body(h)
        elif self.spec.trunk == "conv1d":
            h = (h + self.body(h) if self.spec.residual else self.body(h)).mean(-1)
        elif self.spec.trunk == "conv2d":
            h = (h + self.body(h) if self.spec.residual else self.body(h)).mean((-2, -1))
        else:
            h = self.body(h)
            if self.spec.memory:
                h = self.attend_memory(h)
        return h * self.scale if self.spec.buffer else h

    def forward(self, x, y=None):
        logits = self.head(self.features(x))
        loss = _loss(self.spec, logits, y) if y is not None else None
        out = self.spec.output
        if out == "tensor":
            return loss if loss is not None else logits
        if out == "tuple":
            return (loss, logits) if loss is not None else (logits,)
        if out == "dict":
            return {"loss": loss, "logits": logits} if loss is not None else {"logits": logits}
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(loss=loss, logits=logits)


def _loss(spec: Spec, logits, y):
    if spec.trunk in TOKEN_TRUNKS:
        return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=0)
    return F.cross_entropy(logits, y)


def build(spec: Spec, seed: int) -> GenModel:
    torch.manual_seed(seed)
    return GenModel(spec)


def batch(spec: Spec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if spec.trunk in TOKEN_TRUNKS:
        x = torch.randint(0, V, (B, T), generator=g)  # 0 is padding: some tokens are
        return x, torch.randint(1, V, (B, T), generator=g)
    shape = {"mlp": (B, D), "conv1d": (B, 4, 12), "conv2d": (B, 3, 6, 6)}[spec.trunk]
    return torch.randn(shape, generator=g), torch.randint(0, CLASSES, (B,), generator=g)


def loss_of(spec: Spec, model, xy) -> torch.Tensor:
    """The loss as the user's loop takes it: from the model's output, or outside it on the
    logits cast ``.float()``."""
    x, y = xy
    if spec.loss_inside:
        out = model(x, y)
        return out if spec.output == "tensor" else \
            out[0] if spec.output == "tuple" else out["loss"]
    out = model(x)
    logits = out if spec.output == "tensor" else \
        out[0] if spec.output == "tuple" else out["logits"]
    return _loss(spec, logits.float(), y)
