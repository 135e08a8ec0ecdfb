"""Hugging Face models as their users call them (``model(input_ids=..., labels=...)``),
trained through zerofx.initialize on 2 real gloo ranks, against single-process AdamW.

GPT-2's loss calls a print-once advisory (traced as a no-op: one graph), BERT's MLM head
reaches its bias under an alias, T5 ties one embedding to three names, Mixtral routes
tokens to experts that a rank may not use in a step: each must train exactly as on one
process (fp32: relative parameter difference <= 1e-5), and bf16/fp16 must bring the loss
down.
"""
import pytest
import torch

from multiproc import run_ranks
from reference import deepspeed_step

pytest.importorskip("transformers", reason="the Hugging Face zoo needs transformers "
                                           "(pip install -e '.[test]')")

from hf_models import HF_MODELS, hf_batch, make_hf  # noqa: E402

STEPS = 3
LR = 1e-2


def _cfg(stage, extra=None):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 5000,
                                 "stage3_param_persistence_threshold": 0}}
    cfg.update(extra or {})
    return cfg


def _vector(model):
    return torch.cat([p.detach().float().reshape(-1) for _, p in model.named_parameters()])


def _train_body(rank, world, name, stage):
    import zerofx

    model = make_hf(name)
    engine, *_ = zerofx.initialize(model=model, config=_cfg(stage))
    for step in range(STEPS):
        loss = engine(**hf_batch(name, 100 * step + rank)).loss
        engine.backward(loss)
        engine.step()
    with engine.runtime.gathered_parameters():  # stage 3: whole again, to compare
        return _vector(model)


def _reference(name, world):
    model = make_hf(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    for step in range(STEPS):
        for r in range(world):
            (model(**hf_batch(name, 100 * step + r)).loss / world).backward()
        deepspeed_step(model, opt, 1.0)  # e.g. an expert no token chose gets zeros
    return _vector(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_model_trains_like_one_process(name):
    results = run_ranks(_train_body, 2, args=(name, 2), timeout_s=240)
    want = _reference(name, 2)
    for rank, got in enumerate(results):
        rel = float((got - want).norm() / want.norm())
        assert rel <= 1e-5, f"{name} rank {rank}: relative difference {rel:.2e}"


def _stage3_body(rank, world, name):
    from zerofx.runtime.param_gather import RanksDivergedError

    try:
        return _train_body(rank, world, name, 3)
    except RanksDivergedError as e:
        return str(e)


@pytest.mark.slow
@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_model_trains_like_one_process_at_stage_3(name):
    """Parameters partitioned (persistence threshold 0: every weight gathered by the graphs,
    GPT-2's break and T5's three-name embedding included). Were Mixtral's routing to make
    the ranks read different experts, that would be refused by name, never mixed (on these
    batches it trains exactly)."""
    results = run_ranks(_stage3_body, 2, args=(name,), timeout_s=240)
    if any(isinstance(r, str) for r in results):
        assert name == "mixtral" and all("different branches" in r for r in results), results
        return
    want = _reference(name, 2)
    for rank, got in enumerate(results):
        rel = float((got - want).norm() / want.norm())
        assert rel <= 1e-5, f"{name} rank {rank}: relative difference {rel:.2e}"


def _low_precision_body(rank, world, name, kind):
    import zerofx

    model = make_hf(name)
    extra = {kind: {"enabled": True, **({"initial_scale_power": 8} if kind == "fp16" else {})}}
    engine, *_ = zerofx.initialize(model=model, config=_cfg(1, extra))
    batch = hf_batch(name, rank)  # one batch per rank, repeated: the loss must fall
    losses = []
    for _ in range(10):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


@pytest.mark.slow
# each model and each dtype once (a Latin square of the 2 x 2): the exact low-precision
# numbers are tested against eager autocast elsewhere (test_mixed_precision, test_generated)
@pytest.mark.parametrize("name, kind", [("gpt2", "fp16"), ("llama", "bf16")])
def test_hf_model_low_precision_loss_falls(name, kind):
    for rank, losses in enumerate(run_ranks(_low_precision_body, 2, args=(name, kind),
                                            timeout_s=240)):
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert losses[-1] < 0.8 * losses[0], f"{name} {kind} rank {rank}: {losses}"
