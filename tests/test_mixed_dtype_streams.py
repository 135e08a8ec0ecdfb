"""bf16 models where a compute-dtype stream meets an fp32 one (Whisper's cross-attention).

Under bf16 the runtime keeps trained weights in the compute dtype and the model is fed fp32,
as under torch.autocast; a frozen fp32 parameter (Whisper's encoder position table) keeps
its stream fp32 while an embedding's stream is bf16. Batched matmuls and attention refuse
mixed inputs while Dynamo traces; their backward writes (an embedding's gradient) refuse
them at run time. Reference: the same model in fp32 under torch.autocast, eagerly.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zerofx
from zerofx.runtime.input_casts import LowPrecisionOps

BF16 = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}}


def test_mode_casts_only_mixed_inputs():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5, dtype=torch.bfloat16)
    with LowPrecisionOps(torch.bfloat16):
        mixed = a @ b
        same = torch.bmm(a, a.transpose(1, 2))
        att = F.scaled_dot_product_attention(b.transpose(1, 2), a, a)
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, a.bfloat16() @ b)
    assert same.dtype == torch.float32  # agreeing inputs are left alone, whatever dtype
    assert att.dtype == torch.bfloat16


class TwoStreams(nn.Module):
    """Queries from token embeddings (trained: bf16 under zerofx), keys from fp32 features
    plus a frozen fp32 table, meeting in a batched matmul."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.table = nn.Parameter(torch.randn(5, 8), requires_grad=False)
        self.k = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids, feats, labels):
        q = self.norm(self.tok(ids))                 # [B, T, 8]
        k = self.k(feats + self.table)               # [B, 5, 8]
        att = torch.softmax(q @ k.transpose(1, 2), -1) @ k
        return F.cross_entropy(self.head(att).flatten(0, 1).float(), labels.flatten())


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 16, (2, 4), generator=g), torch.randn(2, 5, 8, generator=g),
            torch.randint(0, 3, (2, 4), generator=g))


def _autocast_losses(model, batches):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    out = []
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(*b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_two_streams_train_like_autocast(no_torchrun_env):
    torch.manual_seed(0)
    model = TwoStreams()
    ref = TwoStreams()
    ref.load_state_dict(model.state_dict())
    batches = [_batch(0)] * 6  # one batch again and again: the loss must fall
    engine, *_ = zerofx.initialize(model=model, config=BF16)
    losses = []
    for b in batches:
        loss = engine(*b)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses == pytest.approx(_autocast_losses(ref, batches), rel=3e-2)
    assert losses[-1] < losses[0]


def _whisper():
    T = pytest.importorskip("transformers")
    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, dropout=0.0))


@pytest.mark.slow
@pytest.mark.parametrize("features", [torch.float32, torch.bfloat16])
def test_whisper_trains_in_bf16(features, no_torchrun_env):
    """Whisper in bf16 used to fail in zerofx only ("Expected query, key, and value to have
    the same dtype"); its losses now follow eager autocast's."""
    torch.manual_seed(0)
    model = _whisper()
    ref = _whisper()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [dict(input_features=torch.randn(2, 8, 32, generator=g).to(features),
                    labels=torch.randint(3, 64, (2, 4), generator=g)) for _ in range(3)]
    engine, *_ = zerofx.initialize(model=model, config=BF16)
    losses = []
    for b in batches:
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    class Call(nn.Module):  # autocast's reference takes the same keyword batches
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, b):
            return self.m(**b).loss
    ref_losses = _autocast_losses(Call(ref), [(dict(b, input_features=b["input_features"]
                                                      .float()),) for b in batches])
    assert losses == pytest.approx(ref_losses, rel=3e-2)
