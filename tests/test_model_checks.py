"""zerofx/runtime/model_checks.py: what the runtime refuses in a model, before it runs."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import zerofx
from zerofx.config import ConfigError

CFG = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
       "zero_optimization": {"stage": 2}}


class Tokens(nn.Module):
    def __init__(self, kind=nn.Embedding, sparse=True, frozen=False):
        super().__init__()
        self.emb = kind(20, 8, sparse=sparse)
        self.emb.weight.requires_grad_(not frozen)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.emb(x)).pow(2).mean()


@pytest.mark.parametrize("kind", [nn.Embedding, nn.EmbeddingBag])
def test_a_sparse_gradient_module_is_refused_by_name(kind):
    with pytest.raises(ConfigError, match=rf"emb is an {kind.__name__} with sparse=True.*"
                                          r"Build it with sparse=False"):
        zerofx.initialize(model=Tokens(kind), config=CFG)


def test_compile_backend_refuses_it_too():
    """Plain torch.compile: the training graph shows the sparse embedding (bf16 casts would
    otherwise meet its sparse fp32 gradient deep in the backward)."""
    cfg = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}}
    model = torch.compile(Tokens(), backend="zero", options={"config": cfg})
    with pytest.raises(Exception, match=r"emb\.weight: an embedding with sparse=True"):
        model(torch.randint(0, 20, (4, 3))).backward()


def test_a_frozen_sparse_embedding_trains_like_eager():
    """Nothing sparse reaches the buckets when the embedding does not train: accepted, and
    the trained head equals eager AdamW's."""
    torch.manual_seed(0)
    model = Tokens(frozen=True)
    ref = copy.deepcopy(model)
    engine, *_ = zerofx.initialize(model=model, config=CFG)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    for i in range(3):
        x = torch.randint(0, 20, (4, 3), generator=torch.Generator().manual_seed(i))
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        want = ref(x)
        want.backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(model.head.weight, ref.head.weight)
    assert not torch.equal(ref.head.weight, Tokens(frozen=True).head.weight)


def test_plain_compile_of_a_frozen_sparse_embedding_gives_eager_gradients():
    torch.manual_seed(0)
    model, x = Tokens(frozen=True), torch.randint(0, 20, (4, 3))
    ref = copy.deepcopy(model)
    torch.compile(model, backend="zero", options={"config": {}})(x).backward()
    ref(x).backward()
    assert model.emb.weight.grad is None
    torch.testing.assert_close(model.head.weight.grad, ref.head.weight.grad)


class Reentrant(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(8, 8), nn.Linear(8, 1), reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.a(t)), x,
                                              use_reentrant=self.reentrant)
        return self.b(h).pow(2).mean()


@pytest.mark.parametrize("reentrant, grad_input, warned", [
    (True, False, True), (True, True, False), (False, False, False)])
def test_a_reentrant_checkpoint_eager_would_not_train_is_said(reentrant, grad_input, warned,
                                                              caplog):
    """Eager PyTorch gives the region's weights a gradient exactly when no warning is due
    (the reference: eager's own grads); compiled, they always get one."""
    torch.manual_seed(0)
    model, x = Reentrant(reentrant), torch.randn(4, 8, requires_grad=grad_input)
    eager = copy.deepcopy(model)
    with pytest.warns(UserWarning) if reentrant and not grad_input else contextlib.nullcontext():
        eager(x).backward()
    assert (eager.a.weight.grad is None) == warned
    with caplog.at_level("WARNING", logger="zerofx.runtime.model_checks"):
        torch.compile(model, backend="zero", options={"config": {}})(x).backward()
    assert ("use_reentrant=True) region" in caplog.text) == warned
    assert model.a.weight.grad is not None


class Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))
        self.b = nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def test_initialize_runs_no_parametrization():
    """Reading a parametrized ``weight`` runs it: spectral_norm's power iteration would
    advance its ``_u``/``_v`` buffers once more than eager training does."""
    torch.manual_seed(0)
    model = Spectral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zerofx.initialize(model=model, config=CFG)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_float64_model_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)).double()
    with pytest.raises(ConfigError, match=r"parameter '0.weight' is torch.float64 \(and 3 more"
                                          r"\).*model.float\(\)"):
        zerofx.initialize(model=model, config=CFG)


@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_changing_which_parameters_train_after_initialize_is_refused(change):
    """Eager PyTorch would train the new set; zerofx's buffers hold the planned one (an
    unfrozen parameter would never step, a frozen one would keep decaying)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    model[0].requires_grad_(change == "freeze")
    engine, *_ = zerofx.initialize(model=model, config=CFG)
    x = torch.randn(4, 8)
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    model[0].weight.requires_grad_(change == "unfreeze")
    engine.backward(engine(x).pow(2).mean())
    now = "unfrozen" if change == "unfreeze" else "frozen"
    with pytest.raises(ConfigError, match=rf"parameter '0.weight' was {now} .*after "
                                          r"zerofx.initialize.*before zerofx.initialize"):
        engine.step()
